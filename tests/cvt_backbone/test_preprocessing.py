"""`cvt_backbone.normalize` feeds the model what Hugging Face's CvT image processor feeds it."""

import jax
import numpy as np
import pytest

from cvt_backbone import IMAGENET_MEAN, IMAGENET_STD, normalize


def test_normalize_matches_the_hugging_face_image_processor():
  skimage_data = pytest.importorskip('skimage.data')
  transformers = pytest.importorskip('transformers')
  image = skimage_data.astronaut()[:123, :77]  # a real photo, odd size
  from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

  # microsoft/cvt-13's preprocessor_config.json: ConvNextImageProcessor with ImageNet's
  # default mean and std ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).
  np.testing.assert_allclose(IMAGENET_MEAN, IMAGENET_DEFAULT_MEAN)
  np.testing.assert_allclose(IMAGENET_STD, IMAGENET_DEFAULT_STD)
  processor = transformers.ConvNextImageProcessor(
      do_resize=False, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
  reference = processor(image, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  np.testing.assert_allclose(normalize(image), reference, atol=1e-5)
  np.testing.assert_allclose(jax.jit(normalize)(image.astype(np.float32)), reference, atol=1e-5)


def test_normalize_names_the_shape_it_expected():
  with pytest.raises(ValueError, match=r'RGB images \[\.\.\., H, W, 3\], got shape \(8, 8\)'):
    normalize(np.zeros((8, 8)))
