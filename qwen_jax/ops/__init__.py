"""Numerical kernels under the model: attention backends (`ops.attention`), quantized products
(`ops.quant`) and every XLA:CPU specialisation (`ops.cpu`)."""
