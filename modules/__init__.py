"""The engine of MaskPrior Trainer: config, data, models, losses, the trainer."""

import logging

# peft imports bitsandbytes (training.optimizer=adamw8bit) whenever it is installed; on a CPU
# with AVX512-BF16 that import warns that an optional 4-bit matmul kernel, which no part of
# training uses, could not be fetched. Only that module's warnings are silenced.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
