"""The itae-cluster job: embed a folder resumably, cluster (K-Means or a TSP/TEMI head), score,
write the outputs and the HTML report."""
