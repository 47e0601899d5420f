"""Datasets: digits (embedded, real), CIFAR-10/100 and ImageNet folders from a local data_path, synthetic."""
