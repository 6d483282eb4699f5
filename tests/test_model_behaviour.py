"""Behaviour of a trained smoke CNN, in the style of Made With ML's tests/model/: minimum functionality,
invariance and directional expectations. Thresholds leave room for seed noise on a 2,000-image model
(clean test accuracy about 70 %); each fails on a model that ignores the image, a broken preprocessing or
an augmentation that no longer trains invariance."""
import numpy as np
import pytest
import torch
from fmnist_lib.data import Split
from fmnist_lib.models import shift
from fmnist_lib.robustness import corrupt
from fmnist_lib.train import TrainConfig, train

SPLIT = Split(val_size=500, train_size=2000, test_size=1000)
EASY = ('Trouser', 'Sandal', 'Sneaker', 'Bag', 'Ankle boot')  # distinct silhouettes: the classes a working model gets right first


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    data = SPLIT.load()
    cfg = TrainConfig(model='cnn', widths=[16, 32], convs=[1, 1], epochs=4, batch_size=64, lr=0.4, tta='none', **SPLIT.__dict__)
    model = train(cfg, tmp_path_factory.mktemp('cnn'), data=data, progress=False).model
    return data, model, model.predict(data.x_test)


def flipped(model, x, pred):
    "Share of images whose predicted class changes."
    return float((model.predict(x) != pred).mean())


# --- minimum functionality -------------------------------------------------------------------------
def test_minimum_accuracy_and_easy_classes(trained):
    data, model, pred = trained
    assert (pred == data.y_test).mean() >= 0.6
    for c in EASY:
        k = data.classes.index(c)
        recall = (pred[data.y_test == k] == k).mean()
        assert recall >= 0.65, f"{c}: recall {recall:.2f}; a working model recognises distinct silhouettes"


def test_every_class_is_predicted(trained):
    _, _, pred = trained
    assert set(np.unique(pred)) == set(range(10)), "a model that never predicts some class has collapsed"


# --- invariance ------------------------------------------------------------------------------------
@pytest.mark.parametrize('dy, dx', [(1, 0), (-1, 0), (0, 1), (0, -1)])
def test_one_pixel_shift_rarely_changes_the_prediction(trained, dy, dx):
    data, model, pred = trained
    moved = shift(torch.from_numpy(data.x_test).unsqueeze(1), dy, dx).squeeze(1).numpy()
    assert flipped(model, moved, pred) <= 0.25


def test_mirror_image_rarely_changes_the_prediction(trained):
    "Training flips images left-right, so the mirror image is the same garment to the model."
    data, model, pred = trained
    assert flipped(model, data.x_test[:, :, ::-1].copy(), pred) <= 0.25


def test_slight_brightening_rarely_changes_the_prediction(trained):
    data, model, pred = trained
    brighter = np.clip(data.x_test.astype(np.int16) + 10, 0, 255).astype(np.uint8)
    assert flipped(model, brighter, pred) <= 0.12


def test_shuffled_pixels_do_change_the_prediction(trained):
    "The control for the invariance tests: destroying the garment's shape must change most predictions."
    data, model, pred = trained
    rng = np.random.default_rng(0)
    shuffled = data.x_test.reshape(len(data.x_test), -1)[:, rng.permutation(784)].reshape(data.x_test.shape)
    assert flipped(model, shuffled, pred) >= 0.5


# --- directional expectations -----------------------------------------------------------------------
def test_heavy_noise_lowers_confidence(trained):
    data, model, _ = trained
    clean = model.predict_proba(data.x_test).max(1).mean()
    noisy = model.predict_proba(corrupt(data.x_test, 'noise', 5)).max(1).mean()
    assert noisy < clean, (clean, noisy)


def test_a_blank_image_gets_no_confident_answer(trained):
    _, model, _ = trained
    assert model.predict_proba(np.zeros((1, 28, 28), np.uint8)).max() < 0.5


def test_negative_images_are_much_worse(trained):
    "Fashion-MNIST garments are light on black: a negative is out of distribution and accuracy must drop, not hold."
    data, model, pred = trained
    clean = (pred == data.y_test).mean()
    assert (model.predict(255 - data.x_test) == data.y_test).mean() < clean - 0.2
