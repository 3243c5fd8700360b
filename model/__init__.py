"""Yuan 2.0-M32 model math, shared by every role (pure torch: no Ray, gRPC or pydantic here).

The in-process reference engine and the distributed gateway run the same layer code; distribution
only swaps the expert step behind `model.dispatcher.Dispatcher`.
"""
