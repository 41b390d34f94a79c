"""SageMaker entry point: runs `python -m bincounter train` with the job's hyperparameters.

SageMaker (and torchrun) start a script file and pass the hyperparameters as `--name value` arguments;
bincounter.aws.package copies this module to the top of the job's source folder (as sm_entry.py), next
to the bincounter package and the resolved params.yaml, and this forwards everything to the one
training command.
"""

import os
import runpy
import sys


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    os.environ.setdefault("BINCOUNTER_PARAMS", os.path.join(here, "params.yaml"))
    sys.argv = ["bincounter", "train", *sys.argv[1:]]
    runpy.run_module("bincounter", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
