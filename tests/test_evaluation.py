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


@pytest.mark.parametrize('method, passes', [('saliency', True), ('gradcam', True), ('ig', False)])
def test_the_randomization_check_with_the_pages_threshold(method, passes, smoke):
    """The model-randomization check (Adebayo et al., 2018) with the explainability page's own threshold, `RANDOMIZATION_PASS`:
    Saliency and Grad-CAM change when the weights are re-initialized; Integrated Gradients does not (its maps stay close to the
    input times a gradient), which the page reports as a failure. Three re-initializations, so one lucky seed cannot decide."""
    data, model = smoke
    x, t = data.x_test[:20], model.predict(data.x_test[:20])
    r = [ex.randomization_check(model, x, t, method, seed=s)['rank_correlation'] for s in (0, 1, 2)]
    assert all((abs(v) < ex.RANDOMIZATION_PASS) == passes for v in r), f"{method}: rank correlations {r}, threshold {ex.RANDOMIZATION_PASS}"


def test_faithfulness_against_random_needs_an_interval_that_excludes_zero(smoke):
    "Occlusion beats the random ranking with paired intervals clear of 0; the random ranking against another random ranking does not."
    data, model = smoke
    x, t = data.x_test[:60], model.predict(data.x_test[:60])
    di = lambda a: ex.deletion_insertion(model, x, t, a, per_image=True)
    rnd = di(ex.random_attribution(x.shape, 0))
    assert ex.versus_random(di(ex.attribute(model, x, t, 'occlusion')), rnd)['better']
    other = ex.versus_random(di(ex.random_attribution(x.shape, 1)), rnd)
    assert not other['better'], other


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


def _png_claiming(w, h) -> bytes:
    "A PNG whose header claims w × h pixels (its data is a 1 × 1 image): what a decompression bomb looks like from outside."
    import io, struct, zlib
    from PIL import Image
    buf = io.BytesIO(); Image.new('L', (1, 1)).save(buf, 'PNG'); b = bytearray(buf.getvalue())
    b[16:20], b[20:24] = struct.pack('>I', w), struct.pack('>I', h)
    b[29:33] = struct.pack('>I', zlib.crc32(bytes(b[12:29])))
    return bytes(b)


@pytest.mark.parametrize('w, h, found', [(20000, 20000, 'more'), (10000, 5000, '10000 × 5000 = 50,000,000')])
def test_prepare_photo_refuses_too_many_pixels_before_decoding(w, h, found):
    "The header's size is checked before any pixel is decoded (the data behind these headers is a single pixel)."
    with pytest.raises(FmnistError, match=rf'photo bytes: expected at most 40,000,000 pixels, found {found}'):
        rb.prepare_photo(_png_claiming(w, h))


def test_prepare_photo_honours_exif_orientation(tmp_path):
    from PIL import Image
    shot = _shot((300, 200), 'RGB')
    shot.paste((40, 40, 40), (0, 0, 300, 40))                       # a dark band along the top: the shape is not symmetric
    shot.save(tmp_path / 'plain.jpg', quality=95)
    exif = Image.Exif(); exif[0x0112] = 6                            # "rotate 90° clockwise to display", as phones write it
    shot.save(tmp_path / 'tagged.jpg', quality=95, exif=exif)
    upright = rb.prepare_photo(shot.transpose(Image.Transpose.ROTATE_270))
    tagged, plain = rb.prepare_photo(tmp_path / 'tagged.jpg'), rb.prepare_photo(tmp_path / 'plain.jpg')
    assert np.abs(tagged.astype(int) - upright).mean() < 3, "the EXIF orientation was not applied"
    assert np.abs(plain.astype(int) - upright).mean() > 10, "the test image is not asymmetric enough to tell"


def test_prepare_photo_reads_16_bit_png(tmp_path):
    from PIL import Image
    a = np.full((120, 90), 60000, np.uint16); a[20:100, 25:65] = 9000  # a dark garment on a light background, 16-bit
    Image.fromarray(a).save(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode.startswith('I;16')
    eight = rb.prepare_photo(Image.fromarray((a / 257).astype(np.uint8)))
    assert np.abs(rb.prepare_photo(tmp_path / 'deep.png').astype(int) - eight).max() <= 2
    assert eight.max() > 150


def test_temperature_scaling_keeps_accuracy_on_a_real_model(smoke):
    data, model = smoke
    zv, zt = model.logits(data.x_val).numpy(), model.logits(data.x_test).numpy()
    t = ev.fit_temperature(zv, data.y_val)
    assert (ev.softmax(zt, t).argmax(1) == ev.softmax(zt).argmax(1)).all()
    assert ev.nll(zv, data.y_val, t) <= ev.nll(zv, data.y_val) + 1e-9
