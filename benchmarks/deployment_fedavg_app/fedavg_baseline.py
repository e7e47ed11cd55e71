"""The baseline a Flower user has (benchmarks/deployment_1gb.py): Flower's FedAvg strategy
(flwr.serverapp.strategy.FedAvg), one round, initial arrays = the base model's safetensors.
Each ClientApp's train returns its node's fine-tuned checkpoint (node-config checkpoint=<path>)
as an ArrayRecord; its evaluate loads the global arrays into the model (the base file's
folder) and returns the loss on a few fixed texts. The ServerApp saves the
averaged model as safetensors, as a user would. Phase markers in fl-merge's format (train,
aggregate, evaluate, write) so the benchmark splits its samples by phase.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

TEXTS = ["red cat 1", "blue dog 2", "green sun 3", "rain tree 4"]
START = time.perf_counter()


def _mark(name: str) -> None:  # fl_merge.round.clock.PHASE_PATTERN's format
    print(f"fl-merge phase {name} starts {time.perf_counter() - START:.1f} s into the round", flush=True)


class MarkedFedAvg(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):
        _mark("train")
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        _mark("aggregate")
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        _mark("evaluate")
        return super().configure_evaluate(server_round, arrays, config, grid)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from safetensors.torch import load_file, save_file

    global START
    START = time.perf_counter()
    k = len(list(grid.get_node_ids()))
    initial = ArrayRecord(load_file(str(context.run_config["base"])))
    strategy = MarkedFedAvg(min_train_nodes=k, min_evaluate_nodes=k, min_available_nodes=k)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    _mark("write")
    save_file(result.arrays.to_torch_state_dict(), str(context.run_config["output"]))
    _mark("done")


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    from safetensors.torch import load_file

    weights = load_file(str(context.node_config["checkpoint"]))
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(str(context.run_config["base"])).parent  # the LM's folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
    batch = AutoTokenizer.from_pretrained(folder)(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        loss = float(model(**batch, labels=batch["input_ids"]).loss)
    content = RecordDict({"metrics": MetricRecord({"num-examples": len(TEXTS), "loss": loss})})
    return Message(content=content, reply_to=msg)
