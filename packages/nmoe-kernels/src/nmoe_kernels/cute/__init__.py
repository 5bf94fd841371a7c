"""CuTeDSL kernels (nvidia-cutlass-dsl), compiled at first use; import needs the DSL installed."""
