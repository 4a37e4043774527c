"""The one door to KerasHub's shared test harness (a private path)."""

from keras_hub.src.tests.test_case import TestCase as _KerasHubTestCase


class TestCase(_KerasHubTestCase):
    """KerasHub's `TestCase` (run_layer_test, run_backbone_test, ...)."""

    # tf.test.TestCase's `test_session` is a helper that pytest would collect
    # and skip as "Not a test" in every class.
    test_session = None
