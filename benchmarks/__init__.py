"""Side-by-side performance runs that print ratios against peers measured in the same run."""
