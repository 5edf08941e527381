"""Convert the COCO YOLOv8n INT8 TFLite export into a float ultralytics checkpoint (issue #34 item 1).

These machines cannot download ``yolov8n.pt``. ``../shared/weights/yolov8n-coco-int8/yolov8n_int8.tflite``
(see its README) is the official COCO YOLOv8n exported by ultralytics 8.1.42 to TFLite with INT8 weights;
this script dequantises it into ``yolov8n-coco.pt``, an ultralytics checkpoint that ``YOLO(path)`` loads and
``model.train(...)`` fine-tunes (``detection.model: yolov8n-coco.pt`` starts aerosynth's source-only detector
from it).

How:

* the file's sha256 is checked against the shared README's (``--no-verify`` skips it, for another export);
* the 80 class names come from the ``temp_meta.txt`` zip member ultralytics embeds in its TFLite exports;
* a ``yolov8n.yaml`` model with ``nc=80`` is built in ultralytics, and each of its 64 ``Conv2d`` layers is
  given a TFLite ``CONV_2D`` op's weights: INT8 OHWI weights times their per-output-channel scale (zero
  points subtracted), transposed to OIHW; float32 weights (the first and the DFL convolution) as they are;
* which op goes to which layer is found from the activations, not from tensor names or op order (the
  exporter's order differs from ultralytics' in the neck and the head): one image runs through the TFLite
  interpreter with every tensor kept, and through the ultralytics model with a pre-hook on each ``Conv2d``
  that, when the layer is reached, takes the unused op of the same weight shape whose output the layer's
  own input reproduces best (the relative error of that output is reported per layer);
* the export folded each batch norm into its convolution, so the batch norm becomes an identity with the
  op's bias: weight 1, bias = conv bias, running mean 0, running variance ``1 - eps`` (so ``sqrt(var + eps)``
  is 1); fine-tuning updates it as any batch norm;
* the checkpoint is written as ultralytics' ``strip_optimizer`` writes its released weights (FP16 model,
  no optimizer or EMA, ``epoch -1``, default ``train_args``), plus a ``source`` entry naming the TFLite file
  and its sha256.

The TFLite runtime is the ``convert`` extra (``pip install -e .[convert]``: ``ai-edge-litert``); aerosynth
itself does not need it.

Usage: ``python tools/tflite_to_ultralytics.py [--tflite PATH] [--out yolov8n-coco.pt] [--image IMG]``
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from aerosynth.data.manifest import file_sha256

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TFLITE = REPO.parent / "shared" / "weights" / "yolov8n-coco-int8" / "yolov8n_int8.tflite"
#: sha256 of ``yolov8n_int8.tflite`` as the shared README gives it.
EXPECTED_SHA256 = "c8c5ea2b540cee6763aaef944109e710e9be2ee0de6549cff1fd0bae932d6ee6"
META_MEMBER = "temp_meta.txt"
#: A matched layer's output must agree with the TFLite op's within this relative error (L2 norm of the
#: difference over the norm of the op's output); the hybrid INT8 kernels quantise activations, so it is not 0.
MAX_LAYER_ERROR = 0.25


class ConversionError(RuntimeError):
    """The TFLite file is not the export this script converts (checksum, metadata or layer mismatch)."""


@dataclass
class TfliteConv:
    """One ``CONV_2D`` op of the TFLite graph, its weights dequantised.

    Attributes:
        op: the op's index in the interpreter.
        weight: float32 weights, OIHW.
        bias: float32 bias, one per output channel.
        output: index of the op's output tensor (pre-activation).
        quantized: whether the weights were INT8.
    """

    op: int
    weight: np.ndarray
    bias: np.ndarray
    output: int
    quantized: bool


@dataclass
class LayerMatch:
    """Which TFLite op a ``Conv2d`` of the ultralytics model took, and how well its output agrees."""

    layer: str
    op: int
    shape: tuple[int, ...]
    quantized: bool
    rel_error: float
    runner_up_error: float | None


def check_sha256(path: str | Path, expected: str = EXPECTED_SHA256) -> str:
    """Return the file's sha256, or raise :class:`ConversionError` when it is not ``expected``."""
    digest = file_sha256(path)
    if digest != expected:
        raise ConversionError(f"{path}: sha256 {digest}, expected {expected} (another file; --no-verify to convert it)")
    return digest


def read_metadata(path: str | Path) -> dict:
    """The metadata ultralytics embeds in a TFLite export (``temp_meta.txt``, a Python dict literal).

    Raises:
        ConversionError: no such member, or it holds no 80-or-so class ``names``.
    """
    try:
        with zipfile.ZipFile(path) as z:
            text = z.read(META_MEMBER).decode()
    except (zipfile.BadZipFile, KeyError) as e:
        raise ConversionError(f"{path}: no {META_MEMBER} member ({e})") from e
    meta = ast.literal_eval(text)
    names = meta.get("names")
    if not isinstance(names, dict) or sorted(names) != list(range(len(names))):
        raise ConversionError(f"{path}: {META_MEMBER} has no class names indexed 0..n-1")
    return meta


def _interpreter(path: Path):
    """A TFLite interpreter that keeps every intermediate tensor (XNNPACK off: it would fuse them away)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:  # pragma: no cover - the message is the point
        raise ConversionError("the TFLite runtime is missing: pip install -e .[convert] (ai-edge-litert)") from e
    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    return interpreter


def _dequantise(tensor: dict, value: np.ndarray) -> np.ndarray:
    """A weight or bias tensor as float32 (per-axis INT8/INT32 times its scales, zero points subtracted)."""
    if value.dtype == np.float32:
        return value.astype(np.float32)
    q = tensor["quantization_parameters"]
    scales, zeros, axis = q["scales"], q["zero_points"], q["quantized_dimension"]
    if len(scales) == 0:
        raise ConversionError(f"tensor {tensor['name']}: {value.dtype} without quantization scales")
    shape = [1] * value.ndim
    shape[axis] = len(scales)
    if len(scales) == 1:
        shape = [1] * value.ndim
    zeros = zeros if len(zeros) == len(scales) else np.zeros_like(scales)
    return ((value.astype(np.float64) - zeros.reshape(shape)) * scales.reshape(shape)).astype(np.float32)


def tflite_convs(interpreter) -> list[TfliteConv]:
    """Every ``CONV_2D`` op, weights dequantised and transposed OHWI -> OIHW.

    An INT32 bias (full-integer exports) is dequantised with its own scales, which TFLite sets to
    input scale x weight scale; this export's biases are float32.
    """
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    convs = []
    for op in interpreter._get_ops_details():
        if op["op_name"] != "CONV_2D":
            continue
        inputs = list(op["inputs"])
        w_t = details[inputs[1]]
        w_raw = interpreter.get_tensor(inputs[1])
        weight = _dequantise(w_t, w_raw).transpose(0, 3, 1, 2).copy()
        if len(inputs) > 2 and inputs[2] >= 0:
            bias = _dequantise(details[inputs[2]], interpreter.get_tensor(inputs[2])).reshape(-1)
        else:
            bias = np.zeros(weight.shape[0], np.float32)
        convs.append(TfliteConv(op["index"], weight, bias, int(op["outputs"][0]), w_raw.dtype == np.int8))
    return convs


def _probe_image(image: str | Path | None, size: int) -> np.ndarray:
    """The image both models run on while layers are matched: RGB, ``size`` square, 0-1, NHWC float32."""
    from PIL import Image

    if image is None:
        from ultralytics.utils import ASSETS

        image = ASSETS / "bus.jpg"
    rgb = Image.open(image).convert("RGB").resize((size, size), Image.BILINEAR)
    return (np.asarray(rgb, np.float32) / 255.0)[None]


def _set_identity_bn(bn, bias) -> None:
    """A batch norm that passes its input through and adds ``bias`` (eval mode)."""
    import torch

    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)


def build_model(tflite: str | Path, names: dict[int, str], image: str | Path | None = None):
    """The ``yolov8n.yaml`` ultralytics model carrying the TFLite export's weights.

    Returns:
        ``(model, matches, head_error)``: the float32 model in eval mode, one :class:`LayerMatch` per
        ``Conv2d`` (in execution order) and the largest absolute difference of the class scores of the two
        models on the probe image.

    Raises:
        ConversionError: a layer with no TFLite op of its shape, or whose output disagrees.
    """
    import torch
    import torch.nn.functional as F
    from ultralytics.nn.tasks import DetectionModel

    interpreter = _interpreter(Path(tflite))
    (inp,) = interpreter.get_input_details()
    size = int(inp["shape"][1])
    x = _probe_image(image, size)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    convs = tflite_convs(interpreter)

    model = DetectionModel("yolov8n.yaml", nc=len(names), verbose=False).eval()
    model.names = dict(names)
    layers = {m: n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    if len(layers) != len(convs):
        raise ConversionError(f"{len(convs)} CONV_2D ops in the TFLite file, {len(layers)} Conv2d in yolov8n.yaml")
    parents = dict(model.named_modules())
    unused = list(convs)
    matches: list[LayerMatch] = []

    def assign(module, args) -> None:
        name = layers[module]
        (inp_t,) = args
        scored = []
        for c in unused:
            if tuple(c.weight.shape) != tuple(module.weight.shape):
                continue
            ref = torch.from_numpy(interpreter.get_tensor(c.output)).permute(0, 3, 1, 2)
            w, b = torch.from_numpy(c.weight), torch.from_numpy(c.bias)
            out = F.conv2d(inp_t, w, b, module.stride, module.padding, module.dilation, module.groups)
            if out.shape != ref.shape:
                continue
            scored.append((float((out - ref).norm() / ref.norm().clamp_min(1e-12)), c))
        if not scored:
            raise ConversionError(f"{name}: no unused TFLite convolution of shape {tuple(module.weight.shape)}")
        scored.sort(key=lambda s: s[0])
        err, best = scored[0]
        if err > MAX_LAYER_ERROR:
            raise ConversionError(f"{name}: best TFLite op {best.op} reproduces its output within {err:.3f} only")
        unused.remove(best)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(best.weight))
            parent = parents[name.rsplit(".", 1)[0]]
            if module.bias is not None:
                module.bias.copy_(torch.from_numpy(best.bias))
            elif name.endswith(".conv") and isinstance(getattr(parent, "bn", None), torch.nn.BatchNorm2d):
                _set_identity_bn(parent.bn, torch.from_numpy(best.bias))
            elif np.abs(best.bias).max() > 1e-6:  # the DFL convolution: no bias in ultralytics, none in the export
                raise ConversionError(f"{name}: the TFLite op has a bias the layer cannot hold")
        runner_up = scored[1][0] if len(scored) > 1 else None
        matches.append(LayerMatch(name, best.op, tuple(best.weight.shape), best.quantized, err, runner_up))

    hooks = [m.register_forward_pre_hook(assign) for m in layers]
    try:
        with torch.no_grad():
            ours = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    finally:
        for h in hooks:
            h.remove()
    ours = ours[0] if isinstance(ours, (list, tuple)) else ours
    (out,) = interpreter.get_output_details()
    theirs = torch.from_numpy(interpreter.get_tensor(out["index"]))
    if theirs.shape != ours.shape:
        raise ConversionError(f"outputs differ in shape: TFLite {tuple(theirs.shape)}, converted {tuple(ours.shape)}")
    head_error = float((ours[:, 4:] - theirs[:, 4:]).abs().max())
    return model, matches, head_error


def checkpoint(model, meta: dict, tflite: Path, sha256: str) -> dict:
    """The checkpoint dict as ultralytics' ``strip_optimizer`` writes its released weights."""
    from copy import deepcopy

    from ultralytics import __version__
    from ultralytics.cfg import DEFAULT_CFG_DICT

    half = deepcopy(model).half()
    for p in half.parameters():
        p.requires_grad = False
    args = {**DEFAULT_CFG_DICT, "model": "yolov8n.yaml", "data": "coco.yaml", "task": "detect", "imgsz": 640}
    half.args = dict(args)
    return {
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": half,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "scaler": None,
        "stopper": None,
        "train_args": args,
        "source": {
            "file": tflite.name,
            "sha256": sha256,
            "description": meta.get("description"),
            "exported_by": f"ultralytics {meta.get('version')} on {meta.get('date')}",
            "converted_by": "aerosynth tools/tflite_to_ultralytics.py",
        },
    }


def convert(
    tflite: str | Path = DEFAULT_TFLITE,
    out: str | Path = "yolov8n-coco.pt",
    image: str | Path | None = None,
    verify: bool = True,
) -> dict:
    """Convert ``tflite`` into the ultralytics checkpoint ``out`` and return a report.

    Args:
        tflite: the INT8 TFLite export.
        out: where the ``.pt`` goes (written atomically).
        image: the image the layers are matched on (default ultralytics' ``assets/bus.jpg``).
        verify: check the sha256 against :data:`EXPECTED_SHA256`.

    Returns:
        ``{"out", "sha256", "classes", "layers", "int8_layers", "max_layer_error", "max_class_score_diff",
        "matches"}``.

    Raises:
        ConversionError: checksum, metadata or a layer does not fit.
    """
    import torch

    from aerosynth.data.atomic import atomic_output_path

    tflite, out = Path(tflite), Path(out)
    sha = check_sha256(tflite) if verify else file_sha256(tflite)
    meta = read_metadata(tflite)
    names = {int(k): str(v) for k, v in meta["names"].items()}
    model, matches, head_error = build_model(tflite, names, image)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_path(out, ".pt") as tmp:
        torch.save(checkpoint(model, meta, tflite, sha), tmp)
    return {
        "out": str(out),
        "sha256": sha,
        "classes": len(names),
        "layers": len(matches),
        "int8_layers": sum(m.quantized for m in matches),
        "max_layer_error": max(m.rel_error for m in matches),
        "max_class_score_diff": head_error,
        "matches": [m.__dict__ for m in matches],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflite", type=Path, default=DEFAULT_TFLITE)
    parser.add_argument("--out", type=Path, default=Path("yolov8n-coco.pt"))
    parser.add_argument("--image", type=Path, default=None, help="image the layers are matched on (bus.jpg)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check (another export)")
    parser.add_argument("--report", type=Path, default=None, help="also write the per-layer report as JSON")
    a = parser.parse_args(argv)
    try:
        report = convert(a.tflite, a.out, a.image, verify=not a.no_verify)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.report:
        a.report.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(
        f"{report['out']}: {report['classes']} classes, {report['layers']} convolutions "
        f"({report['int8_layers']} INT8), largest layer error {report['max_layer_error']:.4f}, "
        f"largest class-score difference {report['max_class_score_diff']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
