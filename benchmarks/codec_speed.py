"""Single-thread CPU speed of every codec file's `paper` preset (random weights: speed does not depend on them).

    python benchmarks/codec_speed.py [--seconds 10] [--repeats 5] [--only soundstream]

Prints, per codec, the seconds spent per second of audio to encode (waveform -> codes) and to decode
(codes -> waveform), median over `--repeats` runs after one warm-up, on one CPU thread (2-thread timings on
small machines swing by large factors). For codecs with a streaming path (SoundStream) it also prints what one
frame costs to encode and to decode with carried state, fed one frame at a time (the lowest latency) and ten
frames at a time, and the real-time factor of encode + decode one frame at a time (frame duration / time per
frame; above 1 is faster than real time). Numbers depend on the machine: compare rows of one run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def soundstream_model():
    import soundstream
    return soundstream.SoundStream(soundstream.PRESETS["paper"][0])


def random_codebooks(model):
    """Random entries in EnCodec-style codebooks, which start at zero until k-means."""
    for vq in model.quantizer.layers:
        vq.embed.normal_()
        vq.inited.fill_(1)
    return model


def encodec_model():
    import encodec
    return random_codebooks(encodec.EnCodec(encodec.PRESETS["24khz"][0]))


def bigcodec_model():
    import bigcodec
    return bigcodec.BigCodec(bigcodec.PRESETS["paper"][0])


class OfficialBigCodec(torch.nn.Module):
    """The official CodecEncoder / CodecDecoder (PyPI `bigcodec` 0.0.3) behind the codec interface, with
    inference.py's calls; codes (n_q, B, F) turned to (B, Q, F)."""

    def __init__(self):
        super().__init__()
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from test_bigcodec import import_official
        official = import_official()
        self.enc, self.dec = official.CodecEncoder(), official.CodecDecoder()
        self.sample_rate, self.channels, self.codebook_size = 16000, 1, 8192

    def encode(self, wav):
        return self.dec(self.enc(wav), vq=True)[1].permute(1, 0, 2)  # (B, Q, F)

    def decode(self, codes):
        return self.dec(self.dec.vq2emb(codes.permute(0, 2, 1)).transpose(1, 2), vq=False)


def freqcodec_model():
    import freqcodec
    return random_codebooks(freqcodec.FreqCodec(freqcodec.PRESETS["paper"][0]))


class OfficialFreqCodec(torch.nn.Module):
    """FunCodec's FreqCodec (PyPI `funcodec` 0.2.0, the recipe's configuration) behind the codec interface, with
    the calls of reference/codecs.md §8; codes (Q, B, F) turned to (B, Q, F)."""

    def __init__(self):
        super().__init__()
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from test_freqcodec import build_official, import_official
        self.m = build_official(import_official())
        self.m.discriminator = None  # the codec alone, as the other rows count
        self.sample_rate, self.channels, self.codebook_size = 16000, 1, 1024

    def encode(self, wav):
        emb, scale = self.m._encode(wav)[0]
        return self.m.quantizer.encode(emb).permute(1, 0, 2), scale

    def decode(self, sent):
        codes, scale = sent
        return self.m._decode([(self.m.quantizer.decode(codes.permute(1, 0, 2)).transpose(1, 2), scale)])


# One entry per codec file: a function building its paper-preset model with the shared codec interface
# (sample_rate, hop_length, encode, decode; `streaming()` where the model is causal); "-official" rows are the
# authors' code for comparison in the same run (benchmarks/*_vs_official.py compare on identical weights).
CODECS = {"soundstream": soundstream_model, "encodec": encodec_model, "bigcodec": bigcodec_model,
          "bigcodec-official": OfficialBigCodec,  # the official modules, beside ours (needs the PyPI package)
          "freqcodec": freqcodec_model, "freqcodec-official": OfficialFreqCodec}


def median_time(fn, repeats):
    fn()  # warm-up (allocations, oneDNN kernel selection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def bench(name, build, seconds, repeats):
    torch.manual_seed(0)
    model = build().eval()
    wav = 0.1 * torch.randn(1, model.channels, int(seconds * model.sample_rate))  # (1, C, T)
    sent = model.encode(wav)  # codes (1, Q, F), or with side information (EnCodec: codes, scale)
    codes = getattr(sent, "codes", sent[0] if isinstance(sent, tuple) else sent)
    enc = median_time(lambda: model.encode(wav), repeats) / seconds
    dec = median_time(lambda: model.decode(sent), repeats) / seconds
    row = {"codec": name, "sr": model.sample_rate, "params": sum(p.numel() for p in model.parameters()),
           "codes": f"{codes.shape[1]}x{model.codebook_size}", "enc": enc, "dec": dec, "frame_ms": None}
    if hasattr(model, "streaming"):
        M, n = model.hop_length, int(model.frame_rate)  # 1 s of audio, n frames
        x = wav[..., :n * M]
        for chunk in (1, 10):  # frames per call; EnCodec's first call needs 7 (its reflect padding)
            first = max(chunk, model.cfg.kernel_size) if name == "encodec" else chunk
            pieces = [x[..., :first * M]] + list(x[..., first * M:].split(chunk * M, dim=-1))
            code_pieces = [codes[..., :first]] + list(codes[..., first:n].split(chunk, dim=-1))

            def stream_encode():
                with model.streaming():
                    for p in pieces:
                        model.encode(p)

            def stream_decode():
                with model.streaming():
                    for c in code_pieces:
                        model.decode(c)

            row[f"enc_ms_{chunk}"] = 1000 * median_time(stream_encode, repeats) / n
            row[f"dec_ms_{chunk}"] = 1000 * median_time(stream_decode, repeats) / n
        row["frame_ms"] = row["enc_ms_1"] + row["dec_ms_1"]
        row["frame_duration_ms"] = 1000 * M / model.sample_rate
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of the test signal")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", choices=sorted(CODECS), help="benchmark only these codecs")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.seconds:g} s of audio, median of {args.repeats} runs")
    print(f"{'codec':<12} {'rate':>6} {'params':>8} {'codes':>8} {'enc s/s':>8} {'dec s/s':>8}   "
          f"streaming, ms per frame: {'enc x1':>6} {'dec x1':>6} {'enc x10':>7} {'dec x10':>7}  RTF x1")
    for name in args.only or CODECS:
        r = bench(name, CODECS[name], args.seconds, args.repeats)
        stream = (f"{r['enc_ms_1']:>6.2f} {r['dec_ms_1']:>6.2f} {r['enc_ms_10']:>7.2f} {r['dec_ms_10']:>7.2f}  "
                  f"{r['frame_duration_ms'] / r['frame_ms']:.2f} (frame = {r['frame_duration_ms']:.1f} ms)"
                  if r["frame_ms"] else "not streamable")
        print(f"{name:<12} {r['sr']:>6} {r['params'] / 1e6:>7.2f}M {r['codes']:>8} {r['enc']:>8.4f} {r['dec']:>8.4f}   "
              f"{'':>24} {stream}")


if __name__ == "__main__":
    main()
