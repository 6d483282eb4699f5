"""Evaluation in depth on a smoke-trained CNN: attributions beat random, corruptions hurt with severity, photos are prepared."""
import numpy as np
import pytest
from fmnist_lib.core import FmnistError
from fmnist_lib.data import load
from fmnist_lib.train import TrainConfig, train
from fmnist_lib import stats as ev, explain as ex, robustness as rb


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    data = load(val_size=500, train_size=2000, test_size=1000)
    cfg = TrainConfig(model='cnn', widths=[16, 32], convs=[1, 1], epochs=4, batch_size=64, lr=0.4, val_size=500, train_size=2000, test_size=1000)
    return data, train(cfg, tmp_path_factory.mktemp('cnn'), data=data, progress=False).model


def test_integrated_gradients_beats_random_on_deletion(smoke):
    data, model = smoke
    x, t = data.x_test[:60], model.predict(data.x_test[:60])
    ig = ex.deletion_insertion(model, x, t, ex.attribute(model, x, t, 'ig'))
    rnd = ex.deletion_insertion(model, x, t, ex.random_attribution(x.shape, 0))
    assert ig['deletion'] < rnd['deletion'], (ig, rnd)
    assert ig['insertion'] > rnd['insertion'], (ig, rnd)


@pytest.mark.parametrize('method', ['saliency', 'gradcam'])
def test_attributions_of_a_randomized_model_differ(method, smoke):
    "The model-randomization check: a re-initialized network's attributions must not rank pixels like the trained one's."
    data, model = smoke
    x, t = data.x_test[:20], model.predict(data.x_test[:20])
    r = ex.randomization_check(model, x, t, method)['rank_correlation']
    assert r < 0.8, f"{method}: rank correlation {r:.2f} with a random model"


@pytest.mark.parametrize('name', list(rb.CORRUPTIONS))
def test_corruptions_keep_format_and_hurt_more_with_severity(name, smoke):
    data, model = smoke
    x, y = data.x_test, data.y_test
    acc = {}
    for s in (1, 5):
        c = rb.corrupt(x, name, s)
        assert c.shape == x.shape and c.dtype == np.uint8 and 0 <= c.min() and c.max() <= 255
        acc[s] = (model.predict(c) == y).mean()
    assert acc[5] < acc[1], f"{name}: severity 5 ({acc[5]:.3f}) should hurt more than severity 1 ({acc[1]:.3f})"


def test_corrupt_rejects_bad_arguments(smoke):
    data, _ = smoke
    with pytest.raises(FmnistError, match='severity: expected 1, 2, 3, 4 or 5, found 6'):
        rb.corrupt(data.x_test[:2], 'noise', 6)
    with pytest.raises(FmnistError, match='images: expected uint8'):
        rb.corrupt(data.x_test[:2].astype(float), 'noise', 1)


def _shot(size, mode):
    from PIL import Image
    w, h = size
    a = np.full((h, w, 3), 250, np.uint8)
    a[h // 4:3 * h // 4, w // 3:2 * w // 3] = (30, 30, 60)
    im = Image.fromarray(a)
    return im.convert(mode) if mode != 'RGB' else im


@pytest.mark.parametrize('size, mode, fmt', [((800, 600), 'RGB', 'JPEG'), ((256, 256), 'RGBA', 'PNG'), ((64, 48), 'L', 'PNG'),
                                             ((6, 9), 'RGB', 'PNG'), ((5000, 4000), 'RGB', 'JPEG')])
def test_prepare_photo_from_files(size, mode, fmt, tmp_path):
    f = tmp_path / f'shot.{fmt.lower()}'
    _shot(size, mode).save(f, format=fmt)
    out = rb.prepare_photo(f)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() > 100 and out[0, 0] == 0, "the garment is bright on black, as in Fashion-MNIST"
    ys, xs = np.nonzero(out > 20)
    assert max(np.ptp(ys), np.ptp(xs)) >= 26, "the longest side is resized to the frame"
    assert abs(ys.mean() - 13.5) < 2 and abs(xs.mean() - 13.5) < 2, "the object is centred"


def test_prepare_photo_rejects_non_images(tmp_path):
    f = tmp_path / 'notes.txt'
    f.write_text('this is not a photo')
    with pytest.raises(FmnistError, match=r'notes.txt: expected a PNG or JPEG image, found something unreadable'):
        rb.prepare_photo(f)
    with pytest.raises(FmnistError, match='expected a PNG or JPEG image'):
        rb.prepare_photo(tmp_path / 'missing.png')


def test_temperature_scaling_keeps_accuracy_on_a_real_model(smoke):
    data, model = smoke
    zv, zt = model.logits(data.x_val).numpy(), model.logits(data.x_test).numpy()
    t = ev.fit_temperature(zv, data.y_val)
    assert (ev.softmax(zt, t).argmax(1) == ev.softmax(zt).argmax(1)).all()
    assert ev.nll(zv, data.y_val, t) <= ev.nll(zv, data.y_val) + 1e-9
