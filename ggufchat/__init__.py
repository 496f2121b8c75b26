"""ggufchat: the serving engine behind the chat Space (app.py), shared with the build (build/).

Each module owns one thing and says so at its top:

- errors       the exceptions that reach a visitor as a one-line notice
- cpu_backend  registers llama.cpp's fastest CPU variant proven to run on this machine (cached verdict)
- cpu_probe    the child process that proves it: a real K-quant product; a trap kills the child, not the Space
- files        model files: Hub downloads through the HF cache, local paths, integrity checks
- prompt       prompt formats, the injection-proof tokenizer, history fitting
- llama_thread the one thread that runs llama.cpp in this process, and llama.cpp's log filter
- request      one answer as its caller sees it: sampling settings, streamed text, stats, EngineError
- engine       several chats decoded together in one llama.cpp context (slots, sampling, prefix reuse)
- line         the waiting line: seats at the engine, first come first served
- feedback     Like/Dislike rows, pushed to a Hub dataset
- backends     the model store and the llama-cpp-agent provider that feeds the engine
- remote       the same for a llama-server at BACKEND_URL: HTTP client, tokenizer over /tokenize, provider

Nothing here imports Gradio or app.py: the Space imports this package, never the other way round.
"""
