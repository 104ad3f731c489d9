"""Helpers shared by the tests of the MNIST-derived datasets (their fixtures are in conftest.py)."""

import hashlib

import numpy as np


def digit_hashes(images: np.ndarray) -> set:
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}
