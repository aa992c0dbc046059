"""One frozen config per pipeline step, with every default and choice in one place.

This module imports nothing heavy (no TensorFlow, Keras or absl), so that flag parsing and
`--help` stay fast. `pipeline/flags.py` makes one command-line flag per field name: a field
that several steps share (`seed`, `batch_size`, `vocab_size`) is one flag feeding them all,
declared once below. A step's config is its cache key (`cache_key`), less the fields marked
as not changing the output.

>>> TrainingConfig(epochs=2).epochs
2
>>> dataclasses.replace(ModelConfig(), d_model=64).d_model
64
>>> "num_parallel_reads" in cache_key(IngestConfig())
False
"""

import dataclasses
import types
import typing

BUILTIN_PREFIX = "builtin:"
TFDS_PREFIX = "tfds:"
BUILTIN_CORPORA = ("fairy_tales",)
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
SCHEDULES = ("cosine", "inverse_sqrt")
TUNERS = ("hyperband", "bayesian", "random")


def flag_field(default, help: str, *, lower=None, upper=None, choices=None, cached=True):
    """A config field with what its flag needs: help text, bounds, choices. `cached=False`
    marks a field that does not change the step's output (left out of its cache key)."""
    metadata = {"help": help, "lower": lower, "upper": upper, "choices": choices, "cached": cached}
    return dataclasses.field(default=default, metadata=metadata)


# The pipeline's steps, in order (python -m pipeline.run).
STEPS = ("ingest", "tokenizer", "tuner", "trainer", "evaluator", "exporter", "pusher")


# Fields that several steps have: one flag feeds them all.
def _seed():
    return flag_field(42, "Seed for the built-in corpus, the tokenizer, initialisation, shuffling and sampling.")


def _batch_size():
    return flag_field(32, "Examples per batch, in training and evaluation.", lower=1)


def _init_from():
    return flag_field(None, "Fine-tune a pretrained keras-hub preset instead of training storygen's own model: a "
                      "handle (t5_small_multi, flan_small_multi, bart_base_en, kaggle://..., hf://...) or a directory "
                      "that save_to_preset wrote. The preset's tokenizer and shape are used.")


def _vocab_size():
    # The model's is the trained tokenizer's actual size, which the pipeline sets.
    return flag_field(8000, "SentencePiece vocabulary size (includes 256 byte pieces).", lower=300)


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """ExampleGen: which stories to read, how to read them and how to split them."""

    data: str = flag_field(BUILTIN_PREFIX + "fairy_tales",
                           "Story source: builtin:fairy_tales, tfds:NAME[/CONFIG][:SPLIT], or .jsonl/.json/.csv/.tsv/"
                           ".txt/.tfrecord(s) files (optionally .gz): a file, a directory or a glob, local or any "
                           "tf.io.gfile path.")
    seed: int = _seed()
    builtin_count: int = flag_field(6000, "Stories to sample from the built-in corpus.", lower=1)
    builtin_langs: tuple[str, ...] = flag_field(("zh", "en"), "Languages of the built-in corpus.")
    eval_fraction: float = flag_field(0.05, "Fraction of stories in the eval split.", lower=0.0, upper=0.5)
    test_fraction: float = flag_field(0.05, "Fraction of stories in the test split.", lower=0.0, upper=0.5)
    num_shards: int = flag_field(2, "TFRecord shards per split.", lower=1)
    window_bytes: int = flag_field(1024, "Longest story window in UTF-8 bytes; longer stories become several windows, "
                                  "each prompted by the text before it.", lower=64)
    max_chars: int = flag_field(1_000_000, "Records with a longer field are quarantined.", lower=1)
    max_bad_fraction: float = flag_field(0.01, "Stop when more than this fraction of records is bad.",
                                         lower=0.0, upper=1.0)
    encoding: str = flag_field("utf-8", "Text encoding of the input files (e.g. gbk).")
    text_key: str | None = flag_field(None, "JSON key, CSV/TSV column or TFRecord feature that holds the story "
                                     "(default: 'story', or else 'text').")
    prompt_key: str = flag_field("prompt", "Key, column or feature of the prompt (optional: without one, the story's "
                                "opening becomes the prompt).")
    title_key: str = flag_field("title", "Key, column or feature of the title (optional).")
    lang_key: str = flag_field("lang", "Key, column or feature of the language: zh, en or other (optional: detected "
                              "from the script when absent).")
    tags_key: str = flag_field("tags", "Key, column or feature of the tags: a list, or one comma-separated string "
                              "(optional).")
    text_separator: str | None = flag_field(None, "Separator between stories in a .txt file, e.g. '\\n\\n' (a blank "
                                           "line) or '<|endoftext|>'; \\n, \\t and \\r are understood (default: one "
                                           "story per file).")
    tfds_text_key: str | None = flag_field(None, "Feature that holds the story in a tfds:NAME source (default: as "
                                          "--text_key).")
    tfds_data_dir: str | None = flag_field(None, "Where tfds:NAME datasets are prepared (default: $TFDS_DATA_DIR or "
                                          "~/tensorflow_datasets); ingest never downloads one.")
    beam_pipeline_args: str | None = flag_field(
        None, "Run ingest as an Apache Beam pipeline with these options (pip install 'storygen[beam]'), e.g. "
        "'--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing' or a remote runner's "
        "options; the examples, quarantine and statistics are the in-process run's (default: in process).")
    examples_dir: str | None = flag_field(
        None, "Use this ingest output (an earlier run's ingest/ folder, e.g. on storage every host mounts) instead of "
        "ingesting --data, so that the hosts of a multi-worker run share one ingest.")
    num_parallel_reads: int = flag_field(1, "Input files read ahead in parallel threads (1 = one after another); the "
                                        "output is the same either way.", lower=1, cached=False)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """The SentencePiece model trained on the training split."""

    vocab_size: int = _vocab_size()
    seed: int = _seed()
    init_from: str | None = _init_from()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The StoryTransformer's shape (`vocab_size` is the trained tokenizer's, set by the
    pipeline), or the pretrained preset to fine-tune (`init_from`), whose shape is its own."""

    max_prompt_tokens: int = flag_field(64, "Longest prompt the encoder reads (its last tokens are kept).", lower=2)
    max_story_tokens: int = flag_field(384, "The decoder's window: longest story window it learns to write (a "
                                      "built-in English story is about 330 tokens).", lower=2)
    d_model: int = flag_field(128, "Width of the Transformer.", lower=8)
    num_layers: int = flag_field(2, "Encoder layers, and as many decoder layers.", lower=1)
    num_heads: int = flag_field(4, "Attention heads.", lower=1)
    ff_dim: int = flag_field(512, "Width of the feed-forward blocks.", lower=8)
    dropout: float = flag_field(0.0, "Dropout rate (training ends with the epoch of the lowest validation loss, which "
                                "guards against overfitting too).", lower=0.0, upper=0.9)
    vocab_size: int = _vocab_size()
    init_from: str | None = _init_from()
    lora_rank: int = flag_field(0, "With --init_from: fine-tune rank-N LoRA factors of the attention's query and value "
                                "projections instead of all weights (keras-hub's enable_lora; the export merges "
                                "them); 0 = all weights.", lower=0)

    def story_transformer_args(self) -> dict:
        """StoryTransformer's constructor arguments (the fields that are its shape)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in ("init_from", "lora_rank")}


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The training loop: optimizer, schedule, stopping, precision, strategy, checkpoints."""

    batch_size: int = _batch_size()
    epochs: int = flag_field(12, "Passes over the training split (--time_budget may end training first).", lower=1)
    steps: int = flag_field(0, "Train this many optimizer steps in all (0 = --epochs epochs, each drawing as many "
                           "stories as the training split holds).", lower=0)
    learning_rate: float = flag_field(3e-3, "Peak AdamW learning rate.", lower=0.0)
    warmup_steps: int = flag_field(100, "Linear warm-up steps before the decay (at most a tenth of the run's steps).",
                                   lower=0)
    weight_decay: float = flag_field(0.01, "AdamW weight decay.", lower=0.0)
    lr_schedule: str = flag_field("cosine", "After warm-up: cosine decay to 10% of the peak at the last step, or "
                                 "inverse-square-root decay.", choices=SCHEDULES)
    clip_norm: float = flag_field(1.0, "Clip gradients to this global norm (0 = off).", lower=0.0)
    label_smoothing: float = flag_field(0.0, "Label smoothing of the training loss.", lower=0.0, upper=0.5)
    early_stopping_patience: int = flag_field(0, "Stop when validation loss has not improved for this many epochs "
                                             "(0 = off); from the first epoch that does not improve, the learning "
                                             "rate decays to where that would stop the run. Training always ends "
                                             "with the best epoch's weights.", lower=0)
    time_budget: float = flag_field(540.0, "Stop training after this many seconds, at the end of a step, and "
                                   "evaluate; the learning rate then decays to where the budget will end the run, "
                                   "so that run is annealed too (0 = no limit). The default keeps the default "
                                   "run within 15 minutes on 2 CPU cores.", lower=0.0)
    mixed_precision: bool = flag_field(True, "Train with mixed_bfloat16 where the hardware has bf16 (a CPU with "
                                      "AVX512-BF16 or AMX, a GPU, a TPU; elsewhere float32); the saved model "
                                      "computes in float32.")
    jit_compile: bool = flag_field(False, "XLA-compile the training step (recompiles for every batch shape).")
    checkpoint_every_steps: int = flag_field(100, "Checkpoint every this many steps (and at each epoch's end); a rerun "
                                            "of a killed run resumes from the newest.", lower=1, cached=False)
    distribution_strategy: str = flag_field("default", "tf.distribute strategy to train under; multi_worker_mirrored "
                                           "reads the cluster from TF_CONFIG (see README).", choices=STRATEGIES)
    tpu: str = flag_field("", "TPU name or grpc:// address for --distribution_strategy=tpu ('' = local).", cached=False)
    profile_steps: tuple[int, ...] | None = flag_field(None, "Two step numbers FIRST,LAST: record a TensorBoard "
                                                      "profiler trace of those training steps.")
    seed: int = _seed()


# What the tuner searches: these fields of ModelConfig and TrainingConfig (ranges in components/tuner.py).
TUNED_MODEL_FIELDS = ("d_model", "num_layers", "num_heads", "ff_dim", "dropout", "lora_rank")
TUNED_TRAINING_FIELDS = ("learning_rate", "warmup_steps", "label_smoothing")


@dataclasses.dataclass(frozen=True)
class TunerConfig:
    """The KerasTuner search that, with `tune`, runs before training."""

    tune: bool = flag_field(False, "Search model and training hyperparameters with KerasTuner before training; the "
                           "trainer then uses the best ones (best_hparams.json) instead of their flags.")
    tuner: str = flag_field("hyperband", "KerasTuner search algorithm; Hyperband's trial count follows from "
                           "--max_epochs_per_trial (2: 5 trials, 3: 8, 4: 15).", choices=TUNERS)
    max_trials: int = flag_field(8, "Most trials to run (bayesian, random).", lower=1)
    max_epochs_per_trial: int = flag_field(2, "Most epochs one trial trains.", lower=1)
    tune_steps_per_epoch: int = flag_field(0, "Batches in a trial's epoch (0 = the whole training split).", lower=0)
    tune_time_budget: float = flag_field(0.0, "Start no new trial after this many seconds (0 = no limit).", lower=0.0)
    tune_workers: int = flag_field(0, "0: trials run in this process; N: a KerasTuner chief (the oracle) and N worker "
                                  "processes on this machine, over loopback.", lower=0)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """The evaluator's metrics and the blessing that gates the push."""

    batch_size: int = _batch_size()
    eval_generate_count: int = flag_field(64, "Test prompts to continue, greedily and with serving_default's "
                                          "sampling, for the generation metrics.", lower=1)
    seed: int = _seed()
    min_gain_over_ngram: float = flag_field(0.0, "Blessing of a first model (none pushed yet): its test bits per "
                                            "character must be at most the character 5-gram baseline's times (1 - "
                                            "this); 0 = no worse than the 5-gram, 0.1 = at least 10% better.",
                                            lower=0.0, upper=1.0)
    max_bpc_regression: float = flag_field(0.01, "Blessing of a later model: how much worse than the pushed model's "
                                          "bits per character the candidate may be.", lower=0.0)
    max_bits_per_char: float = flag_field(0.0, "Blessing, opt-in: an absolute ceiling on the candidate's test bits "
                                         "per character (0 = off; what is reachable depends on the corpus and "
                                         "language).", lower=0.0)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """The SavedModel's sampling defaults (serving_default) and request limit."""

    max_new_tokens_limit: int = flag_field(2048, "Most tokens one generate request may ask for; beyond "
                                          "--max_story_tokens the decoder continues with a sliding window.", lower=1)
    temperature: float = flag_field(0.8, "Sampling temperature of serving_default (0 = greedy).", lower=0.0)
    top_k: int = flag_field(40, "Top-k filter of serving_default (0 = off).", lower=0)
    top_p: float = flag_field(0.95, "Top-p (nucleus) filter of serving_default (1 = off).", lower=0.0, upper=1.0)


@dataclasses.dataclass(frozen=True)
class PushConfig:
    """Where the pusher puts versions, and whether an unblessed model may go."""

    serving_model_dir: str = flag_field("saved_models", "Where the pusher puts <model_name>/<version>/.")
    model_name: str = flag_field("storygen", "Model name under --serving_model_dir (as TF Serving sees it).")
    force_push: bool = flag_field(False, "Push even a model the evaluator did not bless (with a warning).")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run itself: where its artifacts go and whether earlier steps are reused."""

    pipeline_root: str = flag_field("runs", "Directory that holds every run's artifacts.")
    run_id: str | None = flag_field(None, "Name of this run's folder under --pipeline_root (default: a timestamp). "
                                   "Rerunning an id resumes it: finished steps are kept.")
    cache: bool = flag_field(True, "Reuse a step's outputs from an earlier run with the same inputs and parameters "
                            "(--nocache recomputes everything).")
    stop_after: str | None = flag_field(None, "Stop after this step, e.g. ingest (to ingest once for several hosts: "
                                       "see --examples_dir).", choices=STEPS[:-1])


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every step's config: what `python -m pipeline.run` runs with."""

    run: RunConfig = RunConfig()
    ingest: IngestConfig = IngestConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    tuner: TunerConfig = TunerConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    push: PushConfig = PushConfig()

    @classmethod
    def from_values(cls, values: dict) -> "PipelineConfig":
        """Each step's config from {field name: value} (the flags' values); missing names keep their defaults."""
        steps = {}
        for step in dataclasses.fields(cls):
            hints = typing.get_type_hints(step.type)
            names = {f.name for f in dataclasses.fields(step.type)} & set(values)
            steps[step.name] = step.type(**{name: _typed(hints[name], values[name]) for name in names})
        return cls(**steps)


def flag_fields() -> dict[str, tuple[dataclasses.Field, typing.Any]]:
    """{name: (field, type hint)} of every field that is a command-line flag, in step order
    (a name that several steps share is one flag: `_seed`, `_batch_size`, `_vocab_size`)."""
    found = {}
    for step in dataclasses.fields(PipelineConfig):
        hints = typing.get_type_hints(step.type)
        for field in dataclasses.fields(step.type):
            if "help" in field.metadata:
                found.setdefault(field.name, (field, hints[field.name]))
    return found


def value_type(hint):
    """The type a field holds when it is set: `int` for `int | None`, `tuple[str, ...]` for itself."""
    return next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint) \
        if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def _typed(hint, value):
    """A flag value as the field's type: lists become tuples (configs are frozen and hashable)."""
    if isinstance(value, list):
        item = (typing.get_args(value_type(hint)) or (str,))[0]
        return tuple(item(v) for v in value)
    return value


def cache_key(config) -> dict:
    """The fields of a step's config that change its output, as plain JSON values."""
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
            if field.metadata.get("cached", True)}
