"""Pruning: ``prune`` (one shot), ``GradualPruning`` (a schedule), ``deploy_pruned`` (inference layers),
``compact`` (pruned channels removed), and the dataflow graph they share."""
