"""Runs vLLM's own `vllm bench serve` client on request, in one long-lived process (the vLLM venv's python).

Usage: vllm_driver.py URL TOKENIZER OUT_DIR INPUT_LEN OUTPUT_LEN
then one line per run on stdin: RATE NUM_PROMPTS BURSTINESS PREFIX (burstiness "inf": constant
rate). Each run writes OUT_DIR/PREFIX.json (detailed) and answers "done PREFIX" on stdout.
One import of vLLM serves every run, so the two clients can be interleaved rate by rate.
"""
import os
import sys

# answers go to the original stdout; everything vLLM prints goes to stderr
REPLY = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

from vllm.benchmarks.serve import add_cli_args, main  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402


def run(url, tokenizer, out_dir, input_len, output_len, rate, n, burst, prefix):
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--model", "sim-model", "--tokenizer", tokenizer,
        "--dataset-name", "random", "--random-input-len", input_len, "--random-output-len", output_len,
        "--num-prompts", n, "--request-rate", rate, "--burstiness", burst, "--ignore-eos",
        "--request-id-prefix", prefix, "--save-result", "--save-detailed", "--result-dir", out_dir,
        "--result-filename", prefix + ".json", "--disable-tqdm", "--seed", "0"])
    main(args)


if __name__ == "__main__":
    url, tok, out, ilen, olen = sys.argv[1:6]
    print("ready", file=REPLY, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        rate, n, burst, prefix = line.split()
        run(url, tok, out, ilen, olen, rate, n, burst, prefix)
        print("done", prefix, file=REPLY, flush=True)
