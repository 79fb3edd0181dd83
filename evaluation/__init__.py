"""Evaluation stage: instruction-following benchmarks (IFEval, IFBench) and their scoring."""
