"""``tritonkv-chat``: talk to a tritonkv server, streaming the reply as it arrives.

    tritonkv-chat --url 127.0.0.1:8001                 # interactive: one conversation, many turns
    tritonkv-chat --url 127.0.0.1:8001 -p "Hello"      # one prompt, then exit
    tritonkv-chat --http 127.0.0.1:8000 -p "Hello"     # one prompt over HTTP generate_stream

Interactive mode keeps one conversation (one correlation id): each line you type is one user
message, rendered with the checkpoint's chat template (the OpenAI API's renderer; ``--system``
is the system message), and only what the template adds to what the server already holds is
sent: the server keeps the KV of the rest. The template comes from ``--checkpoint``, else
from the checkpoint the server reports (Triton's model-config API) when that directory is on
this machine. ``--raw`` sends lines as typed instead. ``/new`` starts a fresh conversation,
``/quit`` or Ctrl-D ends it (END is sent). ``--stats`` prints TTFT, tokens/s and cached tokens
after each reply (on stderr).
"""

from __future__ import annotations

import argparse
import sys

from tritonkv_client.errors import ServerError
from tritonkv_client.result import GenerationResult


def stats_line(result: GenerationResult) -> str:
    parts = [f"{result.num_tokens} tokens", f"finish {result.finish_reason}"]
    if result.ttft_s is not None:
        parts.append(f"TTFT {result.ttft_s * 1000:.0f} ms")
    if result.tpot_s is not None:
        parts.append(f"TPOT {result.tpot_s * 1000:.1f} ms")
    if result.output_tokens_per_s is not None:
        parts.append(f"{result.output_tokens_per_s:.1f} tok/s")
    if result.cached_tokens is not None:
        parts.append(f"{result.prompt_tokens} new prompt tokens, {result.cached_tokens} context tokens reused")
    return "[" + ", ".join(parts) + "]"


def stream_to(out, turn) -> GenerationResult:
    """Write each text delta as it arrives; return the whole result."""
    for delta in turn:
        out.write(delta.text)
        out.flush()
    out.write("\n")
    out.flush()
    return turn.result()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tritonkv-chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="127.0.0.1:8001", help="gRPC address (default %(default)s)")
    where.add_argument("--http", metavar="URL", help="use HTTP generate_stream at this address (one-shot only)")
    p.add_argument("-p", "--prompt", help="send this one prompt and exit (no conversation kept)")
    p.add_argument("--system", help="the system message of the conversation")
    p.add_argument("--checkpoint", help="checkpoint directory whose chat template and tokenizer to use (default: "
                                        "the one the server reports, if it is on this machine)")
    p.add_argument("--raw", action="store_true", help="no chat template: send the text as typed (--system "
                                                      "text goes before the first line)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1.0)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--cache-salt", help="prefix-cache namespace (tenant)")
    p.add_argument("--stats", action="store_true", help="print TTFT / tokens/s / cached tokens per reply")
    return p


def settings_of(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def templated_chat(args):
    """A TemplatedChat for these arguments, None with --raw; raises ValueError saying what to pass."""
    if args.raw:
        return None
    from tritonkv_client.chat_turns import TemplatedChat, served_checkpoint

    checkpoint = args.checkpoint or served_checkpoint(grpc_url=args.url, http_url=args.http)
    if checkpoint is None:
        raise ValueError("the server's checkpoint is not on this machine: pass --checkpoint DIR (for its chat "
                         "template and tokenizer) or --raw")
    return TemplatedChat(checkpoint, args.system)


def one_shot(args, out, err) -> int:
    chat = templated_chat(args)
    prompt = input_ids = None
    if chat is None:
        prompt = (args.system or "") + args.prompt
    else:
        input_ids = chat.user_turn(args.prompt).ids
    if args.http:
        from tritonkv_client.http_client import HttpClient

        turn = HttpClient(args.http, **settings_of(args)).generate_stream(prompt, input_ids=input_ids)
        result = stream_to(out, turn)
    else:
        from tritonkv_client.grpc_client import Client

        with Client(args.url, **settings_of(args)) as client:
            result = stream_to(out, client.generate_stream(prompt, input_ids=input_ids, cache_salt=args.cache_salt))
    if args.stats:
        err.write(stats_line(result) + "\n")
    return 0


def interactive(args, stdin, out, err) -> int:
    from tritonkv_client.grpc_client import Client

    if args.http:
        err.write("interactive chat needs gRPC conversations (--url); --http takes -p PROMPT\n")
        return 2
    interactive_tty = stdin.isatty()
    chat = templated_chat(args)
    with Client(args.url, **settings_of(args)) as client:
        conv = client.conversation(cache_salt=args.cache_salt)
        pending_system = args.system
        try:
            while True:
                if interactive_tty:
                    out.write("> ")
                    out.flush()
                line = stdin.readline()
                if not line:
                    break
                text = line.rstrip("\n")
                if text in ("/quit", "/exit"):
                    break
                if text == "/new":
                    conv.close()
                    conv = client.conversation(cache_salt=args.cache_salt)
                    pending_system = args.system
                    if chat is not None:
                        chat.reset()
                    err.write("[new conversation]\n")
                    continue
                if not text.strip():
                    continue
                try:
                    if chat is None:
                        result = stream_to(out, conv.send((pending_system or "") + text))
                    else:
                        turn = chat.user_turn(text)
                        if turn.restart:  # the template rewrote the history: a fresh conversation
                            conv.close()
                            conv = client.conversation(cache_salt=args.cache_salt)
                        result = stream_to(out, conv.send(input_ids=turn.ids))
                        chat.assistant_reply(result.text)
                except ServerError as e:
                    err.write(f"server error: {e}\n")
                    if chat is not None:  # the server holds nothing of this turn: start over
                        conv.close()
                        conv = client.conversation(cache_salt=args.cache_salt)
                        chat.reset()
                    continue
                pending_system = None
                if args.stats:
                    err.write(stats_line(result) + "\n")
        finally:
            conv.close()
    return 0


def main(argv=None, stdin=None, out=None, err=None) -> int:
    args = build_parser().parse_args(argv)
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    try:
        if args.prompt is not None:
            return one_shot(args, out, err)
        return interactive(args, stdin, out, err)
    except ServerError as e:
        err.write(f"server error: {e}\n")
        return 1
    except ValueError as e:  # no chat template / checkpoint: what to pass
        err.write(f"tritonkv-chat: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
