"""The job's source: this package, the resolved params, requirements and the entry script, in one folder.

SageMaker uploads the folder and starts `ENTRY_SCRIPT` in it; the entry script is bincounter.aws.entry,
copied to the folder's top level (SageMaker and torchrun start a file, not a module).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from bincounter.aws.redact import redact_tree
from bincounter.config import Config

ENTRY_SCRIPT = "sm_entry.py"
REQUIREMENTS = "requirements.txt"


def package_source(config: Config, dest: Path, extra_requirements: tuple[str, ...] = ()) -> Path:
    """dest/ = bincounter/ (this package) + params.yaml (the resolved config) + requirements.txt + sm_entry.py."""
    import mlflow

    import bincounter

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(bincounter.__file__).parent, dest / "bincounter", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = config.to_dict()
    params["train"]["backend"] = "local"  # inside the container the job trains itself
    if params["train"]["weights_path"]:
        print(f"sagemaker: train.weights_path={params['train']['weights_path']} is a local file the job cannot "
              "read; ignored (use train.pretrained=true to download torchvision weights in the job)")
        params["train"]["weights_path"] = ""
    # the job reads its params from S3 and may log them: no passwords in URIs, keys or tokens (aws.redact)
    (dest / "params.yaml").write_text("# written by bincounter for a SageMaker job: the launching config\n"
                                      + yaml.safe_dump(redact_tree(params), sort_keys=False))
    # what the PyTorch training image lacks; torch/torchvision/numpy come with the image, never reinstall them.
    # mlflow-skinny at the launching side's exact version: the tracking client and pyfunc without the server's
    # dependencies (sqlalchemy, flask, pyarrow...), which would take minutes to install and clash with the image's
    requirements = [f"mlflow-skinny=={mlflow.__version__}", "pandas", "matplotlib", "pyyaml", "tqdm",
                    *extra_requirements]
    (dest / REQUIREMENTS).write_text("\n".join(requirements) + "\n")
    shutil.copyfile(Path(__file__).with_name("entry.py"), dest / ENTRY_SCRIPT)
    return dest


