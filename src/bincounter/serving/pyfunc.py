"""The served model: an MLflow pyfunc around the trained network, with its own preprocessing.

The contract (serving, HPO, deployment and checks rely on it):
- input: a DataFrame with a column `image` of base64-encoded JPEG or PNG bytes, any size;
- output: one row per image with `count` (int), `confidence` (probability of that count) and
  `probabilities` (list over 0..max_count);
- a row that is not base64 or not an image raises an error naming the row (HTTP 400 when served);
  so do more than MAX_ROWS rows and an image above MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS.
Decoding and resizing use bincounter.images.decode_and_resize and bincounter.model.eval_transform, the
exact functions behind training's validation and test sets.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

BATCH = 64
MAX_ROWS = 1024  # one request at most; larger batches should be split by the client
# One image at most (decoded bytes, pixels); ABID photos are ~50 KB and ~0.2 MP. Env overrides for servers.
MAX_IMAGE_BYTES = int(os.environ.get("BINCOUNTER_MAX_IMAGE_BYTES", str(16 * 2**20)))
MAX_IMAGE_PIXELS = int(os.environ.get("BINCOUNTER_MAX_IMAGE_PIXELS", "50000000"))


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_row(index: int, value, stored_size: int) -> np.ndarray:
    from bincounter.images import BadImage, decode_and_resize

    if not isinstance(value, (str, bytes)):
        raise _bad(f"row {index}: 'image' must be a base64 string, got {type(value).__name__}")
    if len(value) * 3 // 4 > MAX_IMAGE_BYTES + 3:  # refuse before decoding anything
        raise _bad(f"row {index}: image is {len(value) * 3 / 4 / 2**20:.1f} MiB; "
                   f"at most {MAX_IMAGE_BYTES / 2**20:g} MiB per image")
    try:
        text = value if isinstance(value, bytes) else value.encode("ascii")
        data = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _bad(f"row {index}: 'image' is not valid base64") from None
    _check_pixels(index, data)
    try:
        return decode_and_resize(data, stored_size)
    except BadImage as exc:
        raise _bad(f"row {index}: {exc}") from None


def _check_pixels(index: int, data: bytes) -> None:
    """Read only the header: a small file can declare a huge canvas (decompression bomb)."""
    from PIL import Image

    limit = f"at most {MAX_IMAGE_PIXELS / 1e6:g} megapixels"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise _bad(f"row {index}: image has too many pixels; {limit}") from None
    except Exception:  # noqa: BLE001 - not an image: decode_and_resize says so in its own words
        return
    if width * height > MAX_IMAGE_PIXELS:
        raise _bad(f"row {index}: image is {width}x{height} pixels; {limit}")


class BinCounterPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch

        from bincounter.model import eval_transform, load_model_dir

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.model_config = load_model_dir(context.artifacts["model_dir"], self.device)
        self.transform = eval_transform(self.model_config["image_size"])

    def predict(self, context, model_input, params=None):
        import torch

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise _bad("input must be a table with a column 'image' of base64-encoded JPEG/PNG bytes")
        if len(model_input) == 0:
            raise _bad("no images in the request")
        if len(model_input) > MAX_ROWS:
            raise _bad(f"{len(model_input)} images in one request; send at most {MAX_ROWS}")
        stored = self.model_config["stored_size"]
        arrays = [decode_row(i, v, stored) for i, v in enumerate(model_input["image"].tolist())]
        probabilities = []
        with torch.no_grad():
            for start in range(0, len(arrays), BATCH):
                batch = torch.from_numpy(np.stack(arrays[start : start + BATCH])).permute(0, 3, 1, 2)
                batch = self.transform(batch).to(self.device)
                probabilities.append(torch.softmax(self.model(batch).float(), dim=1).cpu().numpy())
        probs = np.concatenate(probabilities).astype(np.float64)
        counts = probs.argmax(axis=1)
        return pd.DataFrame({
            "count": counts.astype(np.int64),
            "confidence": probs[np.arange(len(probs)), counts],
            "probabilities": [row.tolist() for row in probs],
        })


def encode_image_file(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def example_image_b64(array: np.ndarray) -> str:
    """A real (prepared) bin photo as base64 JPEG, for the logged input example."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pip_requirements() -> list[str]:
    import PIL
    import torch
    import torchvision

    return [
        f"mlflow=={mlflow.__version__}",  # keep identical in training, serving image and client
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"pillow=={PIL.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        "pyyaml",
        "tqdm",
    ]


def log_pyfunc(model_dir: Path, example_b64: str, registered_model_name: str | None = None):
    """Log (and optionally register) the pyfunc; the bincounter package travels with it as code."""
    import bincounter

    from mlflow.models import infer_signature
    from mlflow.pyfunc import PythonModelContext

    example = pd.DataFrame({"image": [example_b64]})
    loaded = BinCounterPyfunc()  # only to infer the signature; the logged instance stays empty, so
    loaded.load_context(PythonModelContext(artifacts={"model_dir": str(model_dir)}, model_config={}))
    signature = infer_signature(example, loaded.predict(None, example))  # the weights are stored once
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=BinCounterPyfunc(),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(Path(bincounter.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
    )
