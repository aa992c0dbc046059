"""The built-in corpus as a tensorflow-datasets dataset, `storygen_fairy_tales`, generated
locally from the story grammar (nothing is downloaded).

    import components.corpus.tfds_builder  # registers storygen_fairy_tales with tfds
    train = tfds.load("storygen_fairy_tales", split="train", data_dir=...)

or, from the command line, `tfds build storygen_fairy_tales --imports=components.corpus.tfds_builder
--data_dir=...`. Ingest reads it back as `--data=tfds:storygen_fairy_tales:train`.

Configs set the sizes: `small` (the default: 2,000 train / 200 test stories) and `large`
(20,000 / 2,000); train and test are independent samples (different seeds).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from components import corpus


@dataclasses.dataclass(eq=False)
class StorygenFairyTalesConfig(tfds.core.BuilderConfig):
    """How many stories each split holds, and the seed of the training split (test uses seed + 1)."""

    train_size: int = 2000
    test_size: int = 200
    seed: int = 1


class StorygenFairyTales(tfds.core.GeneratorBasedBuilder):
    """Fairy tales and fables in Chinese and English from storygen's built-in grammar, each with
    its prompt (the opening), the story that follows, tags and the exact log-probability."""

    # tfds would find this file through `importlib_resources`, a backport it does not install on
    # Python 3.9+, and fail to prepare the dataset; so it is told.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        StorygenFairyTalesConfig(name="small", description="2,000 train and 200 test stories."),
        StorygenFairyTalesConfig(name="large", description="20,000 train and 2,000 test stories.",
                                 train_size=20_000, test_size=2_000),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Text(doc="The opening the story continues."),
                "story": tfds.features.Text(doc="The continuation."),
                "lang": tfds.features.Text(doc="'zh' or 'en'."),
                "tags": tfds.features.Sequence(tfds.features.Text(), doc="The genre: fable or fairy_tale."),
                "log_prob": tfds.features.Scalar(np.float64, doc="Natural log-probability of the whole story."),
            }),
            supervised_keys=("prompt", "story"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the grammar needs no files
        config = self.builder_config
        return {"train": self._generate_examples(config.train_size, config.seed),
                "test": self._generate_examples(config.test_size, config.seed + 1)}

    def _generate_examples(self, n, seed):
        for story in corpus.sample(n, seed=seed):
            yield story["id"], {key: story[key] for key in ("prompt", "story", "lang", "tags", "log_prob")}
