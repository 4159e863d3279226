"""laas exporters: Hugging Face models and GGUF files -> quantized ONNX packages for the model store.

Layer: build tooling, never imported by the daemon. Heavy dependencies (torch, transformers, optimum,
gguf) come from the optional extra `export` and are imported only inside the steps that need them;
`laas.exporters.deps.require` names the extra when one is missing.

    source.py    what is being exported (a GGUF file or a Hugging Face folder) and loading it in torch
    export.py    optimum's text-generation-with-past export (cached per source), fused into the fp32 package
    fuse.py      the graph rewrite to GroupQueryAttention that lets the engine keep its KV cache in place
    quantize.py  onnxruntime dynamic int8 and int4 weight-only (MatMulNBits) quantization
    grid4.py     int4 weights kept on a GGUF's own 4-bit grid;  siblings.py  q/k/v (gate/up) as one MatMul
    evaluate.py  perplexity on a held-out text, top-1 agreement, size, decode speed
    package.py   manifests, the quality gate, installing packages into the store
    pipeline.py  the whole `laas export` run;  cli.py  the `laas export` and `laas eval` commands
"""
