"""The one way storygen's command-line programs start, parse flags, log and fail.

Every entry point (`python -m pipeline.run`, `pipeline.generate`, `storygen-serve`,
`storygen-client`, `python -m components.corpus`, `python -m benchmarks.run`, the tuner's
search processes) calls `run`. Importing this module loads no TensorFlow, so `--help` and
flag errors answer at once; programs import TensorFlow inside their `main`.

Exit status:
    0  done
    1  a UserError: a bad path, record, flag value or environment, said in one sentence
    2  a usage error: an unknown flag, a value of the wrong type, an unexpected argument
    3  (`pipeline.run`) every step ran, but the evaluator did not bless the model, so it was not pushed
(`--help` and `--helpshort` print the flags and exit 1, as absl's do; `pipeline.run` lists
them grouped by step.)

TensorFlow's C++ start-up lines (the oneDNN notices, CUDA stubs and `cuInit` failures on a
machine without a GPU, the CPU-feature notice) are silenced, and Python logging is kept to
warnings, unless `--verbosity` (`-v`) asks for more.
"""

import os
import sys
import tempfile

from absl import app, flags

from components.common import UserError

EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_PUSHED = 3
ERROR_MARK = "error: "  # what starts the one sentence of a failure, after the program's name


def run(main, *, max_args: int = 0, usage: str = "", uses_tensorflow: bool = True, logs_info: bool = False,
        flags_help=None):
    """Parses the flags, then calls `main(args)` with the positional arguments (at most
    `max_args`; `usage` names them in the error). A UserError ends the program with its
    sentence on stderr and status 1; a usage error with status 2. With `uses_tensorflow`,
    TensorFlow is imported (quietly) before `main` runs. `logs_info` keeps absl's INFO lines
    (a server's request and summary lines); otherwise only warnings are logged. `flags_help()`,
    if given, is what `--help` and `--helpshort` list instead of absl's one alphabetical group."""
    program = _program_name()

    def parse(argv):
        if flags_help and any(arg in ("--help", "--helpshort", "-?") for arg in argv[1:]):
            doc = (sys.modules["__main__"].__doc__ or "").strip()
            print(f"{doc}\n\nflags:\n\n{flags_help()}\n\n--helpfull lists absl's own flags too.")
            sys.exit(1)  # as absl's help does
        try:
            args = flags.FLAGS(argv)[1:]
        except flags.Error as e:
            _fail(program, f"{e} (see --help)", EXIT_USAGE)
        if len(args) > max_args:
            expected = f"expected at most {max_args} ({usage})" if max_args else "flags take the form --name=value"
            _fail(program, f"unexpected arguments {' '.join(args)}: {expected}.", EXIT_USAGE)
        return args

    def absl_main(args):
        verbose = flags.FLAGS["verbosity"].present
        if not verbose:
            # TensorFlow's C++ logging reads it when TensorFlow loads, which is after this.
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # fatal only: the rest is `cuInit` noise on CPUs
        if uses_tensorflow:
            import_tensorflow()
        if not verbose:
            _quiet_python_logs(logs_info)
        try:
            main(args)
        except UserError as e:
            _fail(program, str(e), EXIT_USER_ERROR)

    app.run(absl_main, flags_parser=parse)


def _program_name() -> str:
    """How the user started this program: `python -m pipeline.run`, or `storygen-serve`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(sys.argv[0])


def _fail(program: str, message: str, status: int):
    print(f"{program}: {ERROR_MARK}{message}", file=sys.stderr, flush=True)
    sys.exit(status)


def import_tensorflow():
    """Imports TensorFlow, with its start-up lines dropped unless --verbosity is given.

    TensorFlow prints them through absl's C++ logging while it loads, before it reads
    TF_CPP_MIN_LOG_LEVEL, so stderr points at a scratch file meanwhile; should the import
    fail, what it printed is shown after all. For programs that need TensorFlow only on some
    paths (`cli.run(..., uses_tensorflow=False)`), to call on those."""
    if "tensorflow" in sys.modules or flags.FLAGS["verbosity"].present:
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    stderr = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(stderr, 2)
            scratch.seek(0)
            sys.stderr.buffer.write(scratch.read())
            raise
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)


def _quiet_python_logs(logs_info: bool):
    import logging as python_logging

    from absl import logging

    if not logs_info:
        logging.set_verbosity(logging.WARNING)
    tensorflow_log = python_logging.getLogger("tensorflow")
    tensorflow_log.setLevel(python_logging.WARNING)
    # The steps trace a function once per batch shape on purpose (scoring, decoding), which
    # TensorFlow reports as excessive retracing.
    tensorflow_log.addFilter(lambda record: "tf.function retracing" not in record.getMessage())
