"""Reading models: architecture adapters (`adapters/`, one module per family), the one loader
(`loading`), checks and sizes read from a checkpoint's files before any weights (`files`,
`sizes`, `checks`), raw safetensors shards (`shards`), one decoder layer at a time (`layerwise`),
where a model fits (`placement`, with the host memory a container's limit leaves: `host_memory`) and quantised expert formats (`quantized`).
"""
