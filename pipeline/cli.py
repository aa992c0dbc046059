"""What storygen's command-line programs share: argument checks, quiet logging, clear errors."""

import sys

from absl import app, flags

from components.common import UserError


def run(body):
    """Runs `body()` as an absl app: stray arguments are a usage error, TensorFlow logs only
    warnings unless --verbosity asks for more, and a UserError ends the program with its one
    sentence and exit status 1."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).")
        quiet_logging_unless_asked()
        try:
            body()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(main)


def quiet_logging_unless_asked():
    import logging as python_logging

    from absl import logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        python_logging.getLogger("tensorflow").setLevel(python_logging.WARNING)
