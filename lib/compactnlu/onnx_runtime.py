"""Models in ONNX Runtime: the fp32 export and the session behind the study's model interface.
The ONNX quantization methods built on them are ``compactnlu.quant.onnx_int8`` (ORT's dynamic
int8) and ``compactnlu.quant.onnx_nbits`` (the PC-PTQ model keeping its bits).

The ORT int8 reference takes three steps, each a folder the study's size helper
(``compactnlu.bench.artifact_size_mb``, which counts ``model.*``, ``config.json`` and
``quantization.json``) can measure:

``export_onnx(model, folder)``
    ``model.onnx`` (fp32; inputs ``input_ids`` and ``attention_mask``, int64 ``[batch, seq]``;
    outputs only the logits of the model's tasks, in ``TASKS`` order), ``config.json`` and,
    when the model slot-fills, the CRF's three parameter tensors in ``model.crf.safetensors``.
``quant.onnx_int8.quantize_onnx_dynamic(src_folder, dst_folder, reduce_range=None)``
    ORT's pre-processing then ``quantize_dynamic`` (int8 weights, 7-bit on CPUs without
    VNNI; activations quantized on the fly), plus ``quantization.json`` naming the choice
    and the CPU it was made for; config and CRF copied unchanged.
``OnnxNLU.load(folder, threads=None, spinning=False)``
    An ``onnxruntime.InferenceSession`` behind the study's model interface, so
    ``compactnlu.metrics.predict`` evaluates it like any torch variant. The CRF's Viterbi
    stays in torch (``BIOCRF.decode``): it is the same decoding rule for every variant,
    and it is not what quantization changes.

Nothing here unpickles anything: ONNX protobuf, safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .artifacts import atomic_dir
from .cpu import has_vnni
from .interface import NLUOutput
from .model import TASKS, BIOCRF, MultiTaskNLU, NLUConfig, assert_finite, pack_words

LOGITS = {"id": "intent_logits", "dc": "domain_logits", "sf": "slot_logits"}
INPUTS = ("input_ids", "attention_mask")
ONNX_FILE = "model.onnx"
CRF_FILE = "model.crf.safetensors"  # "model.*": counted by artifact_size_mb like the weights
OPSET = 20  # what torch 2.13's dynamo exporter emits natively (no version conversion); ORT 1.32 runs it
SPINNING = "session.intra_op.allow_spinning"
STOP_SPINNING = "session.force_spinning_stop"  # workers stop spinning as each run returns
PROTOBUF_LIMIT = 2 * 1024**3  # one .onnx file holds at most 2 GiB (xlm-roberta-base fp32 is ~1.1 GB)


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits of the model's tasks``, a tuple in ``TASKS`` order."""

    def __init__(self, model: MultiTaskNLU):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return tuple(out[LOGITS[t]] for t in self.model.tasks)


def output_names(tasks) -> list[str]:
    return [LOGITS[t] for t in TASKS if t in tasks]


@contextlib.contextmanager
def _quiet_export():
    """Keep the exporter's chatter out of notebooks: progress lines, notes about optional
    torchvision ops, and pytree/axis-name warnings that say nothing about this model."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _example_inputs(model: MultiTaskNLU) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of different lengths (one padded), 2 x 7: neither dimension is 0 or 1, so
    torch.export cannot specialise batch or sequence length to a constant."""
    enc = model.encoder.config
    pad = enc.pad_token_id if enc.pad_token_id is not None else 1
    body = 5 if enc.vocab_size > 5 else 0
    ids = torch.full((2, 7), pad, dtype=torch.long)
    ids[0, :] = body
    ids[1, :4] = body
    return ids, (ids != pad).long()


def export_onnx(model: MultiTaskNLU, folder: Path | str) -> Path:
    """Write ``model.onnx`` (fp32, dynamic batch and sequence axes), ``config.json`` and
    ``model.crf.safetensors`` to ``folder`` (atomically); return the folder.

    Exporter: torch.onnx.export with ``dynamo=True`` (torch 2.13's default, built on
    torch.export). Both exporters give the same logits for the test models, but the legacy
    TorchScript tracer warns that transformers' mask code turns tensors into Python bools
    (``masking_utils``, ``sdpa_attention``), i.e. branches may be frozen to the example's
    shapes, and it is deprecated. torch.export instead records every shape condition as a
    guard on the symbolic ``batch``/``seq`` dims and fails loudly if one would specialise
    them, so a model it exports is dynamic for real.

    Attention: the encoder's own implementation is kept (transformers' default, SDPA);
    the dynamo exporter lowers SDPA to plain MatMul/Softmax ONNX ops, numerically the same
    as eager attention, so no ``attn_implementation`` switch is needed.

    The model is copied (to CPU, fp32, eval: dropout off) and left untouched.
    """
    folder = Path(folder)
    net = copy.deepcopy(model).cpu().float().eval()
    assert_finite(net.state_dict(), f"export_onnx to {folder}")
    n_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    if n_bytes >= PROTOBUF_LIMIT:
        raise ValueError(f"{n_bytes / 1e9:.2f} GB of weights do not fit one .onnx file (2 GiB protobuf limit); "
                         "external-data export is not supported here")
    wrapper = _LogitsOnly(net).eval()
    names = output_names(net.tasks)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with atomic_dir(folder) as tmp, _quiet_export(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, _example_inputs(net), dynamo=True, verbose=False, opset_version=OPSET,
            input_names=list(INPUTS), output_names=names, external_data=False,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        # The exporter annotates every node with its Python stack trace (metadata_props):
        # debugging text, ~0.3 MB even for a toy model, that would distort the size of small
        # artifacts. A deployed model does not carry it.
        for node in program.model.graph.all_nodes():
            node.metadata_props.clear()
        program.save(tmp / ONNX_FILE, external_data=False)
        (tmp / "config.json").write_text(net.config.to_json())
        if "sf" in net.tasks:
            save_file({k: v.detach().contiguous() for k, v in net.crf.state_dict().items()}, tmp / CRF_FILE)
    return folder


def copy_sidecars(src: Path, dst: Path) -> None:
    """Copy ``config.json`` and the CRF (if any) from one ONNX folder to another, unchanged."""
    for name in ("config.json", CRF_FILE):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


class OnnxNLU:
    """An ONNX Runtime session behind the study's model interface (``interface.NLUModel``).

    ``model(**batch)`` reads ``input_ids`` and ``attention_mask`` (other keys are ignored:
    labels give no loss here) and returns an ``NLUOutput`` holding the task logits as
    float32 torch tensors (no states, no loss);
    ``decode_slots`` runs the torch CRF's Viterbi, rebuilt from ``config.json`` tags and
    ``model.crf.safetensors``.
    """

    def __init__(self, session, config: NLUConfig, crf: BIOCRF | None, folder: Path | None = None,
                 quantization: dict | None = None):
        self.session = session
        self.config = config
        self.crf = crf
        self.folder = folder
        self.quantization = quantization
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        expected = output_names(config.tasks)
        if sorted(self.output_names) != sorted(expected):
            raise ValueError(f"the ONNX graph outputs {self.output_names}, the config's tasks need {expected}")
        if "sf" in config.tasks and crf is None:
            raise ValueError("a slot-filling model needs its CRF")

    @classmethod
    def load(cls, folder: Path | str, threads: int | None = None, spinning: bool = False) -> "OnnxNLU":
        """The session for ``folder``: ``threads`` intra-op threads (torch's count by default).

        ``spinning``: whether ORT's workers busy-wait for work during a run (else they sleep
        between tasks). Either way they stop at the end of each run
        (``session.force_spinning_stop``): ORT's default, spinning on after a run, takes the
        cores from whatever torch runs next. Measured on 2 cores (AMD EPYC, AVX-512), one-off
        probes: at the study's size, a pass of the composed test with ORT int8 took 10.3 s with
        ORT's default and 5.8 s not spinning, and the baseline's latency p50 in Table 2 fell from
        9.5 to 3.2 ms once ORT stopped spinning; at XLM-R-base's size, torch's dynamic int8 at
        batch 1 took 17.4 ms alone, 34.9 ms interleaved with ORT's default and 18.6 ms with the
        stop, while ORT itself took 18.9 and 19.3 ms. Which of sleeping or spinning in a run is
        faster depends on the size: sleeping at the study's (a pass 6.1 s against 7.5 s with the
        stop), spinning at XLM-R-base's (batch 1: 29 ms spinning, 51 ms sleeping, both without the
        stop). Each caller passes the faster one for its size.
        """
        import onnxruntime as ort

        folder = Path(folder)
        config = NLUConfig.from_json((folder / "config.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(SPINNING, "1" if spinning else "0")
        options.add_session_config_entry(STOP_SPINNING, "1")
        session = ort.InferenceSession(str(folder / ONNX_FILE), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        crf = None
        if "sf" in config.tasks:
            crf = BIOCRF(config.tags)
            crf.load_state_dict(load_file(folder / CRF_FILE))
            crf.eval()
        quant_file = folder / "quantization.json"
        quantization = json.loads(quant_file.read_text()) if quant_file.is_file() else None
        if quantization and quantization.get("reduce_range") is False and not has_vnni():
            warnings.warn(f"{quant_file}: int8 weights use the full 8-bit range, but this CPU has no VNNI, where "
                          "ONNX Runtime's u8s8 kernels saturate and logits drift; quantize again on this machine "
                          "(quantize_onnx_dynamic then chooses reduce_range=True)", RuntimeWarning, stacklevel=2)
        return cls(session, config, crf, folder, quantization)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.config.tasks

    @property
    def threads(self) -> int:
        return int(self.session.get_session_options().intra_op_num_threads)

    def _entry(self, key: str) -> str | None:
        try:
            return self.session.get_session_options().get_session_config_entry(key)
        except Exception:  # unset: ORT's pybind error has no narrower type
            return None

    @property
    def spinning(self) -> bool:
        """Whether ORT's workers busy-wait for work during a run (unset: ORT's default, they do)."""
        return self._entry(SPINNING) != "0"

    @property
    def spinning_after_runs(self) -> bool:
        """Whether spinning workers go on spinning after a run returns (ORT's default; ``load`` stops them)."""
        return self.spinning and self._entry(STOP_SPINNING) != "1"

    def eval(self) -> "OnnxNLU":
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> NLUOutput:
        given = {"input_ids": input_ids, "attention_mask": attention_mask}
        feeds = {name: np.ascontiguousarray(given[name].detach().cpu().numpy(), dtype=np.int64)
                 for name in self.input_names}
        outputs = self.session.run(self.output_names, feeds)
        return NLUOutput(**{name: torch.from_numpy(np.asarray(value, dtype=np.float32))
                            for name, value in zip(self.output_names, outputs)})

    def decode_slots(self, slot_logits: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        """Viterbi tag ids of each example's words (``MultiTaskNLU.decode_slots``'s rule)."""
        packed, mask = pack_words(slot_logits, word_mask)
        return self.crf.decode(packed, mask=mask)
