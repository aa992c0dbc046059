"""Every command-line flag of storygen's pipeline and CLIs, with its help text and default.

The defaults are the default pipeline: the built-in corpus, a model that trains on a
laptop CPU in minutes. `pipeline/configs/*.flags` hold other configurations (--flagfile).
"""

from absl import flags

from components.ingest import BUILTIN_PREFIX
from components.trainer import SCHEDULES, STRATEGIES
from components.tuner import TUNERS


def define_pipeline_flags():
    # Where things go.
    flags.DEFINE_string("data", BUILTIN_PREFIX + "fairy_tales",
                        "Story source: builtin:fairy_tales, tfds:NAME[/CONFIG][:SPLIT], or .jsonl/.json/.csv/.tsv/"
                        ".txt/.tfrecord(s) files (optionally .gz): a file, a directory or a glob, local or any "
                        "tf.io.gfile path.")
    flags.DEFINE_string("pipeline_root", "runs", "Directory that holds every run's artifacts.")
    flags.DEFINE_string("run_id", None, "Name of this run's folder under --pipeline_root (default: a timestamp). "
                        "Rerunning an id resumes it: finished steps are kept.")
    flags.DEFINE_string("serving_model_dir", "saved_models", "Where the pusher puts <model_name>/<version>/.")
    flags.DEFINE_string("model_name", "storygen", "Model name under --serving_model_dir (as TF Serving sees it).")
    flags.DEFINE_integer("seed", 42, "Seed for the built-in corpus, initialisation, shuffling and sampling.")
    flags.DEFINE_boolean("cache", True, "Reuse a step's outputs from an earlier run with the same inputs and "
                         "parameters (--nocache recomputes everything).")

    # Ingest.
    flags.DEFINE_integer("builtin_count", 6000, "Stories to sample from the built-in corpus.")
    flags.DEFINE_list("builtin_langs", ["zh", "en"], "Languages of the built-in corpus.")
    flags.DEFINE_float("eval_fraction", 0.05, "Fraction of stories in the eval split.", lower_bound=0.0, upper_bound=0.5)
    flags.DEFINE_float("test_fraction", 0.05, "Fraction of stories in the test split.", lower_bound=0.0, upper_bound=0.5)
    flags.DEFINE_integer("num_shards", 2, "TFRecord shards per split.", lower_bound=1)
    flags.DEFINE_integer("window_bytes", 1024, "Longest story window in UTF-8 bytes; longer stories become "
                         "several windows, each prompted by the text before it.", lower_bound=64)
    flags.DEFINE_integer("max_chars", 1_000_000, "Records with a longer field are quarantined.", lower_bound=1)
    flags.DEFINE_float("max_bad_fraction", 0.01, "Stop when more than this fraction of records is bad.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_string("encoding", "utf-8", "Text encoding of the input files (e.g. gbk).")
    flags.DEFINE_string("text_key", None, "JSON key, CSV/TSV column or TFRecord feature that holds the story "
                        "(default: 'story', or else 'text').")
    flags.DEFINE_string("prompt_key", "prompt", "Key, column or feature of the prompt (optional: without one, "
                        "the story's opening becomes the prompt).")
    flags.DEFINE_string("title_key", "title", "Key, column or feature of the title (optional).")
    flags.DEFINE_string("lang_key", "lang", "Key, column or feature of the language: zh, en or other (optional: "
                        "detected from the script when absent).")
    flags.DEFINE_string("tags_key", "tags", "Key, column or feature of the tags: a list, or one comma-separated "
                        "string (optional).")
    flags.DEFINE_string("text_separator", None, "Separator between stories in a .txt file, e.g. '\\n\\n' (a blank "
                        "line) or '<|endoftext|>'; \\n, \\t and \\r are understood (default: one story per file).")
    flags.DEFINE_string("tfds_text_key", None, "Feature that holds the story in a tfds:NAME source (default: as "
                        "--text_key).")
    flags.DEFINE_string("tfds_data_dir", None, "Where tfds:NAME datasets are prepared (default: $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets); ingest never downloads one.")
    flags.DEFINE_integer("num_parallel_reads", 1, "Input files read ahead in parallel threads (1 = one after "
                         "another); the output is the same either way.", lower_bound=1)

    # Tokenizer.
    flags.DEFINE_integer("vocab_size", 4000, "SentencePiece vocabulary size (includes 256 byte pieces).", lower_bound=300)

    # Model.
    flags.DEFINE_integer("max_prompt_tokens", 64, "Longest prompt the encoder reads (its last tokens are kept).", lower_bound=2)
    flags.DEFINE_integer("max_story_tokens", 384, "The decoder's window: longest story window it learns to write "
                         "(a built-in English story is about 330 tokens).", lower_bound=2)
    flags.DEFINE_integer("d_model", 128, "Width of the Transformer.", lower_bound=8)
    flags.DEFINE_integer("num_layers", 2, "Encoder layers, and as many decoder layers.", lower_bound=1)
    flags.DEFINE_integer("num_heads", 4, "Attention heads.", lower_bound=1)
    flags.DEFINE_integer("ff_dim", 512, "Width of the feed-forward blocks.", lower_bound=8)
    flags.DEFINE_float("dropout", 0.1, "Dropout rate.", lower_bound=0.0, upper_bound=0.9)

    # Trainer.
    flags.DEFINE_integer("batch_size", 32, "Examples per batch.", lower_bound=1)
    flags.DEFINE_integer("epochs", 4, "Passes over the training split.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 2e-3, "Peak AdamW learning rate.", lower_bound=0.0)
    flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps before cosine decay.", lower_bound=0)
    flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.", lower_bound=0.0)
    flags.DEFINE_integer("steps", 0, "Train this many optimizer steps in all (0 = --epochs epochs, each drawing as "
                         "many stories as the training split holds).", lower_bound=0)
    flags.DEFINE_float("time_budget", 0, "Stop training after this many seconds, at the end of a step, and "
                       "evaluate (0 = no limit).", lower_bound=0)
    flags.DEFINE_enum("lr_schedule", "cosine", SCHEDULES, "After warm-up: cosine decay to 10% of the peak at the "
                      "last step, or inverse-square-root decay.")
    flags.DEFINE_float("clip_norm", 1.0, "Clip gradients to this global norm (0 = off).", lower_bound=0.0)
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the training loss.", lower_bound=0.0,
                       upper_bound=0.5)
    flags.DEFINE_integer("early_stopping_patience", 0, "Stop when validation loss has not improved for this many "
                         "epochs (0 = off).", lower_bound=0)
    flags.DEFINE_boolean("mixed_precision", False, "Train with mixed_bfloat16 where the hardware has bf16 (a CPU "
                         "with AVX512-BF16 or AMX, a GPU, a TPU); the saved model computes in float32.")
    flags.DEFINE_boolean("jit_compile", False, "XLA-compile the training step (recompiles for every batch shape).")
    flags.DEFINE_integer("checkpoint_every_steps", 100, "Checkpoint every this many steps (and at each epoch's end); "
                         "a rerun of a killed run resumes from the newest.", lower_bound=1)
    flags.DEFINE_enum("distribution_strategy", "default", STRATEGIES, "tf.distribute strategy to train under; "
                      "multi_worker_mirrored reads the cluster from TF_CONFIG (see README).")
    flags.DEFINE_string("tpu", "", "TPU name or grpc:// address for --distribution_strategy=tpu ('' = local).")
    flags.DEFINE_list("profile_steps", None, "Two step numbers FIRST,LAST: record a TensorBoard profiler trace "
                      "of those training steps.")
    flags.register_validator("profile_steps", lambda v: v is None or (len(v) == 2 and all(x.isdigit() for x in v)),
                             message="--profile_steps takes two step numbers, e.g. --profile_steps=10,20")

    # Tuner.
    flags.DEFINE_boolean("tune", False, "Search model and training hyperparameters with KerasTuner before training; "
                         "the trainer then uses the best ones (best_hparams.json) instead of their flags.")
    flags.DEFINE_enum("tuner", "hyperband", TUNERS, "KerasTuner search algorithm; Hyperband's trial count "
                      "follows from --max_epochs_per_trial (2: 5 trials, 3: 8, 4: 15).")
    flags.DEFINE_integer("max_trials", 8, "Most trials to run (bayesian, random).", lower_bound=1)
    flags.DEFINE_integer("max_epochs_per_trial", 2, "Most epochs one trial trains.", lower_bound=1)
    flags.DEFINE_integer("tune_steps_per_epoch", 0, "Batches in a trial's epoch (0 = the whole training split).",
                         lower_bound=0)
    flags.DEFINE_float("tune_time_budget", 0, "Start no new trial after this many seconds (0 = no limit).",
                       lower_bound=0)
    flags.DEFINE_integer("tune_workers", 0, "0: trials run in this process; N: a KerasTuner chief (the oracle) and "
                         "N worker processes on this machine, over loopback.", lower_bound=0)

    # Evaluator and pusher.
    flags.DEFINE_integer("eval_generate_count", 64, "Test prompts to continue for the generation metrics.", lower_bound=1)
    flags.DEFINE_float("max_bits_per_char", 4.0, "Blessing: the candidate's test bits per character must not exceed this.",
                       lower_bound=0.0)
    flags.DEFINE_float("max_bpc_regression", 0.01, "Blessing: how much worse than the pushed model's bits per character "
                       "the candidate may be.", lower_bound=0.0)
    flags.DEFINE_boolean("force_push", False, "Push even a model the evaluator did not bless (with a warning).")

    # Exporter: sampling of the serving_default signature, and the longest story a request may ask for.
    flags.DEFINE_integer("max_new_tokens_limit", 2048, "Most tokens one generate request may ask for; beyond "
                         "--max_story_tokens the decoder continues with a sliding window.", lower_bound=1)
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature of serving_default (0 = greedy).", lower_bound=0.0)
    flags.DEFINE_integer("top_k", 40, "Top-k filter of serving_default (0 = off).", lower_bound=0)
    flags.DEFINE_float("top_p", 0.95, "Top-p (nucleus) filter of serving_default (1 = off).", lower_bound=0.0, upper_bound=1.0)


def define_generate_flags():
    flags.DEFINE_string("model_dir", "saved_models/storygen",
                        "A model base path (its newest integer version is used) or one SavedModel directory.")
    flags.DEFINE_multi_string("prompt", ["从前有座山，"], "Prompt to continue; repeat the flag for several.")
    flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate at most (default: the decoder's window; up to "
                         "the model's max_new_tokens_limit, sliding the window).", lower_bound=1)
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).", lower_bound=0.0)
    flags.DEFINE_integer("top_k", 40, "Keep only the k most likely tokens (0 = off).", lower_bound=0)
    flags.DEFINE_float("top_p", 0.95, "Keep the most likely tokens up to this probability (1 = off).",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same story.")

