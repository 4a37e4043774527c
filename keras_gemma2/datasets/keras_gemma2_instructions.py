"""TFDS builder of the bundled glossary instructions (offline)."""

import json

import tensorflow_datasets as tfds

from keras_gemma2.datasets import instructions_path


class KerasGemma2Instructions(tfds.core.GeneratorBasedBuilder):
    """A glossary of made-up words as prompt/response pairs.

    60 invented words, each meaning one ordinary thing; the train split asks
    in five phrasings (300 examples), the test split in two others (120).
    Written for keras_gemma2 (`scripts/make_instructions.py`), Apache-2.0.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "response": tfds.features.Text(),
                }
            ),
            supervised_keys=("prompt", "response"),
            license="Apache-2.0",
        )

    def _split_generators(self, dl_manager):
        # The files ship with the package: nothing is downloaded.
        return {
            split: self._generate_examples(instructions_path(split))
            for split in ("train", "test")
        }

    def _generate_examples(self, path):
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                row = json.loads(line)
                yield (
                    index,
                    {
                        "prompt": row["prompt"],
                        "response": row["response"],
                    },
                )
