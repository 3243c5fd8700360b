"""The gRPC API (`yuan.serving.v1`) and its generated stubs."""
