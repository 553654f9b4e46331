"""The paper's efficiency claims at the paper's scale: size and CPU time of every PTQ method
of the study on the study's model class built at XLM-R-base's shape (notebook 11).

The paper's size and time ratios (KD + PC-PTQ at 0.40x the baseline's size, 0.33x its CPU
time) are about XLM-R-base, 278M parameters; the study's own encoder has about 2M, where
quantizing activations on the fly costs about what the int8 products save. So the same
methods run here on ``MultiTaskNLU`` at XLM-R-base's shape (vocabulary 250,002, hidden 768,
12 layers of 12 heads, MLP 3072, 514 positions) with the study's heads and CRF.

The weights are random (seeded): bytes on disk and time per batch depend on the shapes and
bit-widths, not on the values, so no accuracy is measured here (it would mean nothing).
Static PTQ is calibrated on random-token batches: its scales differ from a trained model's,
not its bytes or its kernels.

The variants have the study's names (``variants.VARIANTS``: ``baseline_static``, ``kd_pcptq_fast``,
``kd_onnx_int8``, ...), each made with its method's settings; ``fp32`` is the random float model
they are all made from, and ``uniform8`` and ``uniform4`` two of notebook 07's candidates.
Every variant is built, saved to a temporary folder under ``artifacts/paper_scale`` (its
bytes measured with ``bench.artifact_size_mb``, then the folder deleted: the fp32 model alone
is 1.1 GB), smoke-run once (which is also its warm-up), and kept in memory for the timing,
which interleaves all variants (``bench.time_passes``, ``bench.latency``). A method that fails
at this scale (an ONNX export, say) leaves a row with its error in ``note``, not a crash.

Modules, in import order: ``shape`` (the model and the settings), ``policy`` (notebook 07's
policy mapped by depth), ``inputs`` (random-token batches), ``build`` (the variants),
``measurement`` (timing, the table, the bars); their public names are importable from here.
"""

from .build import FLOAT, Builder, Variant, build_variants  # noqa: F401
from .inputs import DEFAULT_TOKENS, Inputs, make_inputs, median_tokens, random_batch  # noqa: F401
from .measurement import (  # noqa: F401
    KD_PCPTQ_PATHS, ORT_REFERENCE, SIZE_BAR_VS_FP32, TIME_BAR_VS_FP32, TIME_BAR_VS_ORT, Measurement, bars, environment,
    measure, paper_counterpart, paper_ratios, release, results_table, time_variants,
)
from .policy import (  # noqa: F401
    DEFAULT_POLICY, DEFAULT_POLICY_SOURCE, StudyPolicy, map_policy, mapped, mapped_policy_table, policy_layers,
    study_policy, uniform,
)
from .shape import (  # noqa: F401
    N_DOMAINS, N_INTENTS, N_SLOT_TYPES, PAPER_LAYERS, SEED, SMOKE_SHAPE, XLMR_BASE, Settings, Shape, build_model,
    paper_config, paper_shape, parameter_count, placeholder_tags, settings_for,
)
