"""Edge export: merge an adapter into its backbone, build ONNX (fp32/int8/int4) with a KV
cache, verify it against PyTorch, and run it with onnxruntime alone.

:mod:`fed_llama.export.runtime` (generation) imports neither torch nor flwr; the rest of the
package never imports flwr.
"""
