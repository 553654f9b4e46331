"""Post-training quantization of the study's models, one registered method each (``registry``):
static (eager, min-max calibrated), dynamic (int8 weights, activations quantized on the fly),
precision-controlled (a bit-width per component group, weights stored in those bits) and its
search, and ONNX Runtime (dynamic int8, and the precision model keeping its bits); saving and
loading all of them without pickle, behind one versioned ``quantization.json``."""

from .common import calibration_batches, quantized_dir  # noqa: F401
from .dynamic import DynamicConfig, quantize_dynamic  # noqa: F401
from .groups import apply_policy, precision_groups  # noqa: F401
from .method import DETAILS_FILE, FORMAT_VERSION, MethodConfig, QuantizationMethod  # noqa: F401
from .onnx_int8 import OnnxInt8Config, quantize_onnx_dynamic  # noqa: F401
from .onnx_nbits import NBitsConfig, export_precision_onnx  # noqa: F401
from .precision import PrecisionConfig, apply_config, export_policy  # noqa: F401
from .registry import METHODS, load_quantized, method_of, read_config, read_details, save_quantized  # noqa: F401
from .static import StaticConfig, quantize_static  # noqa: F401
from .stored import PrecisionEmbedding, PrecisionLinear  # noqa: F401
