"""The value network ("critic") of gae and segment_gae: the model and its checkpoint format (`model`), its clipped
value loss and optimizer step (`loss`, run inside the PPO update), and the method that owns it in the loop
(`method`). The GAE math itself is pure and lives in `spo_cli.estimate.gae` and `spo_cli.estimate.segment_gae`."""
