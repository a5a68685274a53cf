"""The pieces of a training run that must survive users and clusters: the output folder's lock, verified
checkpoints, bounded collective waits and the exit statuses. ``lgvq_fast/train.py`` drives them."""
