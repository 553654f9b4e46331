"""Post-training quantization of the study's models: static (eager, min-max calibrated),
dynamic (int8 weights, activations quantized on the fly) and precision-controlled (a bit-width
per component group, weights stored in those bits); saving and loading all three without pickle."""

from .common import calibration_batches, load_quantized, quantized_dir, save_quantized  # noqa: F401
from .dynamic import quantize_dynamic  # noqa: F401
from .precision import apply_policy, precision_groups  # noqa: F401
from .static import quantize_static  # noqa: F401
