"""The data room: episodes -> token rows -> numpy shards -> batches.

    trajectory.py  the episode record (JSON Lines, validated)
    tokenizer.py   the real Qwen3 tokenizer, the demo BPE, or a tokenizer directory
    render.py      trajectory -> rows with teacher labels as branches; `prompt_ids` for policies
    shards.py      atomic shard writer, first-fit packing, the resumable `ShardReader`
    miniswe.py     mini-swe-agent trajectory files -> teacher-only records
    cli.py         `dagger-jax shards build | inspect`, `dagger-jax import-trajectories`
    synthetic.py   random trajectories for tests and benchmarks
"""
