"""The synthetic assistant world standing in for human labellers, and its gold judge."""
