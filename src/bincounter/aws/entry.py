"""SageMaker entry point: runs `python -m bincounter train` with the job's hyperparameters.

SageMaker (and torchrun) start a script file and pass the hyperparameters as `--name value` arguments;
bincounter.aws.package copies this module to the top of the job's source folder (as sm_entry.py), next
to the bincounter package and the resolved params.yaml, and this forwards everything to the one
training command.

When the command fails, its one-line `error: ...` (or the exception's first line) goes to
$SM_OUTPUT_DIR/failure (/opt/ml/output/failure), which SageMaker shows as the job's FailureReason, before
the SDK's driver can put its traceback there (it writes only when no failure file exists).
"""

import os
import runpy
import sys


class _ErrorLines:
    """stderr as it was, remembering the last `error: ...` line bincounter's command line printed."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text):
        for line in str(text).splitlines():
            if line.startswith("error: "):
                self.last = line
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    os.environ.setdefault("BINCOUNTER_PARAMS", os.path.join(here, "params.yaml"))
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in CloudWatch
    sys.argv = ["bincounter", "train", *sys.argv[1:]]
    from bincounter.aws.container import write_failure  # the package sits beside this script

    errors = _ErrorLines(sys.stderr)
    sys.stderr = errors
    try:
        runpy.run_module("bincounter", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            write_failure(errors.last or f"bincounter train exited with status {exc.code}")
        raise
    except BaseException as exc:
        write_failure(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        sys.stderr = errors.stream


if __name__ == "__main__":
    main()
