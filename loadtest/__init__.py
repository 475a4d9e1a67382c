"""Load generator and report for OpenAI-compatible servers (kvserve, vLLM, llama.cpp, `transformers serve`).

`python -m loadtest run` streams completions at a request rate or a concurrency and reports the
metrics of `vllm bench serve`; `python -m loadtest sweep` runs it over KV policies × loads and
writes one JSON, one CSV and a self-contained HTML report. Only kvserve's pure helpers (the passkey
prompt builder) are imported from the server package, so this works against any server."""
