"""The served model: an MLflow pyfunc around the trained network, with its own preprocessing.

The contract (serving, HPO, deployment and checks rely on it):
- input: a DataFrame with a column `image` of base64-encoded JPEG or PNG bytes, any size;
- output: one row per image with `count` (int), `confidence` (calibrated probability of that count),
  `probabilities` (list over 0..max_count) and `expected_count` (the mean of that distribution); `count` is
  decoded as training chose (train.decode: the most likely count or the rounded expected count), with flip
  test-time augmentation when train.tta is on;
- a row that is not base64 or not a JPEG/PNG image raises an error naming the row (HTTP 400 when served);
  so do more than MAX_ROWS rows, an image above MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS, and a request above
  MAX_REQUEST_PIXELS in all (checked from the headers before anything is decoded).
Decoding and resizing use bincounter.images.decode_and_resize and bincounter.model.eval_transform, the
exact functions behind training's validation and test sets.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import io
import os
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

BATCH = 64
MAX_ROWS = 1024  # one request at most; larger batches should be split by the client
# Per image and per request (ABID photos are ~50 KB and ~0.2 MP); environment overrides for servers.
MAX_IMAGE_BYTES = int(os.environ.get("BINCOUNTER_MAX_IMAGE_BYTES", str(8 * 2**20)))
MAX_IMAGE_PIXELS = int(os.environ.get("BINCOUNTER_MAX_IMAGE_PIXELS", "16000000"))
MAX_REQUEST_PIXELS = int(os.environ.get("BINCOUNTER_MAX_REQUEST_PIXELS", "300000000"))
# Full-size decodes at once in this process: bounds memory when many requests arrive together.
_DECODE_SLOTS = threading.BoundedSemaphore(int(os.environ.get("BINCOUNTER_DECODE_SLOTS", "2")))
_LARGE_PIXELS = 4_000_000  # after decoding one this large, hand the freed memory back to the system


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _image_bytes(index: int, value) -> bytes:
    if not isinstance(value, (str, bytes)):
        raise _bad(f"row {index}: 'image' must be a base64 string, got {type(value).__name__}")
    if len(value) * 3 // 4 > MAX_IMAGE_BYTES + 3:  # refuse before decoding anything
        raise _bad(f"row {index}: image is {len(value) * 3 / 4 / 2**20:.1f} MiB; "
                   f"at most {MAX_IMAGE_BYTES / 2**20:g} MiB per image")
    try:
        text = value if isinstance(value, bytes) else value.encode("ascii")
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _bad(f"row {index}: 'image' is not valid base64") from None


def check_request(values: list) -> list[int]:
    """Every row's header before any row is decoded: JPEG or PNG only, at most MAX_IMAGE_PIXELS each and
    MAX_REQUEST_PIXELS in all (a small file can declare a huge canvas). -> each row's pixels."""
    from bincounter.images import BadImage, image_header

    pixels, total = [], 0
    for index, value in enumerate(values):
        try:
            _, width, height = image_header(_image_bytes(index, value))
        except BadImage as exc:
            raise _bad(f"row {index}: {exc}") from None
        if width * height > MAX_IMAGE_PIXELS:
            raise _bad(f"row {index}: image is {width}x{height} pixels; "
                       f"at most {MAX_IMAGE_PIXELS / 1e6:g} megapixels per image")
        pixels.append(width * height)
        total += width * height
        if total > MAX_REQUEST_PIXELS:
            raise _bad(f"the request holds more than {MAX_REQUEST_PIXELS / 1e6:g} megapixels of images "
                       f"(at row {index}); send fewer images per request")
    return pixels


def decode_row(index: int, value, stored_size: int, pixels: int) -> np.ndarray:
    """One row (already checked by check_request, which measured its `pixels`) as the stored-size array."""
    from bincounter.images import BadImage, decode_and_resize

    data = _image_bytes(index, value)
    try:
        with _DECODE_SLOTS:
            array = decode_and_resize(data, stored_size)
    except BadImage as exc:
        raise _bad(f"row {index}: {exc}") from None
    if pixels >= _LARGE_PIXELS:
        _release_memory()
    return array


def _release_memory() -> None:
    """glibc keeps freed blocks of big decodes in its arenas; malloc_trim hands them back (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        values = model_input["image"].tolist()
        pixels = check_request(values)
        arrays = [decode_row(i, v, stored, n) for i, (v, n) in enumerate(zip(values, pixels))]
        from bincounter.model import count_logits, decode_counts, probabilities

        config = self.model_config
        chunks = []
        with torch.no_grad():
            for start in range(0, len(arrays), BATCH):
                batch = torch.from_numpy(np.stack(arrays[start : start + BATCH])).permute(0, 3, 1, 2)
                batch = self.transform(batch).to(self.device)
                logits = count_logits(self.model, batch, tta=config.get("tta", False))
                chunks.append(probabilities(logits, config.get("temperature", 1.0)).cpu().numpy())
        probs = np.concatenate(chunks).astype(np.float64)
        counts = decode_counts(probs, config.get("decode", "argmax"), config.get("decode_cuts"))
        return pd.DataFrame({
            "count": counts,
            "confidence": probs[np.arange(len(probs)), counts],
            "probabilities": [row.tolist() for row in probs],
            "expected_count": probs @ np.arange(probs.shape[1]),
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
