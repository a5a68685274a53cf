"""Command-line arguments of a very small training run, shared by the trainer and eval tests."""

# A very small model and the tiny random text encoder, so that one step costs milliseconds.
TINY = [
    "--text-encoder", "tiny-random", "--batch-size", "4", "--no-progress",
    "--set", "model.resolution=16", "--set", "model.ch=32", "--set", "model.ch_mult=1,1",
    "--set", "model.z_channels=8", "--set", "model.embed_dim=8", "--set", "model.codebook_size=24",
    "--set", "model.mtp_ffn_hidden=16", "--set", "model.max_text_len=12", "--set", "model.disc_ndf=8",
    "--set", "model.disc_layers=2", "--set", "model.disc_start=2", "--set", "data.train_size=40",
    "--set", "data.val_size=8", "--set", "train.val_batch=8", "--set", "train.log_every=1",
    # fixed, whatever the tiny-cpu preset picks for its own run: a constant learning rate (so a run's length does
    # not change its steps), batches read in the main process, validation only at the start and the end
    "--set", "train.lr_schedule=constant", "--set", "train.lr_warmup=0", "--set", "data.num_workers=0",
    "--set", "train.eval_every=0",
]
