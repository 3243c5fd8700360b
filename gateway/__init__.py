"""Gateway: embeddings, attention with its KV/LF cache, the Attention Router, sampling and the
continuous-batching scheduler. `engine.Engine` is the plain class; Ray and gRPC shells wrap it."""
