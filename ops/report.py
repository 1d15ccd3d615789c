"""The short text report of one experiment, read back from the warehouse with SQL."""
from __future__ import annotations


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def experiment_report(conn, exp: str) -> str:
    q = lambda sql: conn.execute(sql, [exp]).fetchall()  # noqa: E731
    study = [line for lines in (f(conn, exp) for f in STUDY_LINES) for line in lines]
    if not (_has(conn, "experiments") and q("SELECT 1 FROM experiments WHERE experiment = ?")):
        if study:     # a run of studies only (./provenance run <spec> --study <name>)
            return "\n".join([f"provenance report: experiment {exp} (studies only)", *study])
        raise KeyError(f"experiment {exp!r} is not in the warehouse")
    models = dict(q("SELECT role, count(*) FROM models WHERE experiment = ? GROUP BY role"))
    full = q("SELECT accuracy, attack_success_rate FROM models WHERE experiment = ? AND role = 'full'")
    sub = q("SELECT avg(accuracy), avg(attack_success_rate) FROM models WHERE experiment = ? "
            "AND role IN ('train', 'heldout')")[0]
    poisoned = q("SELECT count(*) FILTER (WHERE poisoned), count(*) FILTER (WHERE poisoned IS NULL), count(*) "
                 "FROM examples WHERE experiment = ? AND split = 'train'")[0]
    lines = [f"provenance report: experiment {exp}",
             f"  models trained        {sum(models.values())} ({models.get('train', 0)} for attribution, "
             f"{models.get('heldout', 0)} held out for LDS, {models.get('full', 0)} on all data)",
             f"  training examples     {poisoned[2]} ("
             + ("poison truth unknown" if poisoned[1] else f"{poisoned[0]} poisoned") + ")"]
    if full:
        lines.append(f"  clean test accuracy   {_fmt(full[0][0])} (model on all data; "
                     f"mean over subset models {_fmt(sub[0])})")
        lines.append(f"  attack success rate   {_fmt(full[0][1])} (subset models {_fmt(sub[1])})")
    for method, value, lo, hi, nh in q("SELECT method, lds, ci95_low, ci95_high, n_heldout FROM lds "
                                       "WHERE experiment = ? ORDER BY method DESC"):
        lines.append(f"  LDS {method:<18}{_fmt(value)}  [95% CI {_fmt(lo)}, {_fmt(hi)}; {nh} held-out models]")
    rows = q("SELECT method, n_flagged, precision, recall, recall_at_budget, recall_at_fpr01, auroc, "
             "retrain_accuracy, retrain_attack_success_rate, reference_accuracy, reference_attack_success_rate "
             "FROM backdoor_summary WHERE experiment = ?")
    order = {"strongest_feature": 0}
    for row in sorted(rows, key=lambda r: (order.get(r[0], 1), r[0])):
        method, nf, p, r, rb, rf, auc, racc, rasr, ref_acc, ref_asr = row
        lines.append(f"  detector {method:<22} flagged {nf}, precision {_fmt(p)}, recall {_fmt(r)}, "
                     f"recall@|poisoned| {_fmt(rb)}, recall@1%FPR {_fmt(rf)}, AUROC {_fmt(auc)}")
        if racc is not None:
            lines.append(f"    retrained without flagged: accuracy {_fmt(racc)}, attack success {_fmt(rasr)}")
    if rows and rows[0][9] is not None:
        lines.append(f"  retrained without the true poisons (reference): accuracy {_fmt(rows[0][9])}, "
                     f"attack success {_fmt(rows[0][10])}")
    return "\n".join(lines + study)


def _smallify_lines(conn, exp: str) -> list[str]:
    """The Smallify study's networks, where it ran: parameters, accuracy, and the comparison with
    the most accurate static network (means over seeds)."""
    if not _has(conn, "smallify"):
        return []
    rows = conn.execute("SELECT kind, lam, width_frac, any_value(widths), avg(params), avg(test_accuracy), "
                        "avg(params_ratio), avg(speedup_b256), bool_and(similar_accuracy) FROM smallify "
                        "WHERE experiment = ? GROUP BY kind, lam, width_frac ORDER BY kind, avg(params)",
                        [exp]).fetchall()
    if not rows:
        return []
    out = ["  smallify (parameters, accuracy; against the most accurate static network):"]
    for kind, lam, frac, widths, params, acc, ratio, speed, similar in rows:
        what = f"λ={lam:g}" if kind == "smallify" else f"×{frac:g}"
        out.append(f"    {kind:<8} {what:<8} widths {widths:<12} {params:>9.0f} params, accuracy {_fmt(acc)}, "
                   f"{ratio:.1f}x smaller, {speed:.1f}x faster at batch 256" + ("" if similar else " (less accurate)"))
    return out


def _has(conn, table: str) -> bool:
    return bool(conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                             [table]).fetchone()[0])


def _regimes_lines(conn, exp: str) -> list[str]:
    """The two-regimes study's accuracy per schedule (mean ± sd over seeds), where it ran."""
    if not _has(conn, "regimes"):
        return []
    rows = conn.execute("SELECT schedule, avg(test_accuracy), stddev_samp(test_accuracy), count(*), max(epochs) "
                        "FROM regimes WHERE experiment = ? GROUP BY schedule ORDER BY avg(test_accuracy) DESC",
                        [exp]).fetchall()
    if not rows:
        return []
    out = [f"  regimes (test accuracy, {rows[0][4]} epochs, mean ± sd over seeds):"]
    for schedule, mean, sd, n, _ in rows:
        out.append(f"    {schedule:<11} {_fmt(mean)} ± {_fmt(sd or 0.0)} ({n} seeds)")
    return out


def _robustness_lines(conn, exp: str) -> list[str]:
    """The robustness study's rows, where the experiment ran it: natural / robust accuracy per
    scheme, training budget and ensemble size."""
    have = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'robustness'").fetchone()[0]
    if not have:
        return []
    rows = conn.execute("SELECT scheme, eps_train, k, eps_test, natural_accuracy, robust_accuracy FROM robustness "
                        "WHERE experiment = ? ORDER BY scheme, eps_train, k, eps_test", [exp]).fetchall()
    if not rows:
        return []
    out, current = ["  robustness (natural / robust accuracy at each attack budget):"], None
    for scheme, et, k, ee, nat, rob in rows:
        if (scheme, et, k) != current:
            current = (scheme, et, k)
            out.append(f"    {scheme:<8} eps_train {et:<6g} K={k}: natural {_fmt(nat)}")
        out[-1] += f", @{ee:g} {_fmt(rob)}"
    return out


def _threedb_lines(conn, exp: str) -> list[str]:
    """The 3DB study's accuracy over its renders and per object, where it ran."""
    if not _has(conn, "threedb_results"):
        return []
    rows = conn.execute("SELECT object, avg(is_correct::INT), count(*) FROM threedb_results WHERE experiment = ? "
                        "GROUP BY object ORDER BY object", [exp]).fetchall()
    if not rows:
        return []
    total = sum(n for *_, n in rows)
    acc = sum(a * n for _, a, n in rows) / total
    return [f"  threedb ({total} renders): accuracy {_fmt(acc)}; by object "
            + ", ".join(f"{o} {_fmt(a)}" for o, a, _ in rows)]


def _photoguard_lines(conn, exp: str) -> list[str]:
    """The PhotoGuard study, where it ran: each edit against the clean image's edit per
    immunization, the paper's ordering per metric, and the models' quality."""
    if not _has(conn, "photoguard_metrics"):
        return []
    have = {r[0] for r in conn.execute("DESCRIBE photoguard_metrics").fetchall()}
    extra = ", ".join(c if c in have else f"NULL AS {c}" for c in ("encoder_reach", "diffusion_drop"))
    rows = conn.execute("SELECT method, images, psnr, ssim, fid, agreement, linf, l2, seconds_per_image, "
                        f"{extra} FROM photoguard_metrics WHERE experiment = ? ORDER BY CASE "
                        "method WHEN 'clean' THEN 0 WHEN 'reseed' THEN 1 WHEN 'swap' THEN 2 WHEN 'noise' THEN 3 "
                        "WHEN 'encoder' THEN 4 ELSE 5 END", [exp]).fetchall()
    if not rows:
        return []
    out = [f"  photoguard ({rows[0][1]} images; edits against the edit of the clean image):"]
    reach = {}
    for method, _, psnr, ssim, fid, agree, linf, l2, secs, enc, dif in rows:
        reach[method] = (enc, dif)
        line = (f"    {method:<9} PSNR {_fmt(psnr, 2)} dB, SSIM {_fmt(ssim)}, FID {_fmt(fid, 4)}, "
                f"agreement {_fmt(agree)}")
        if secs is not None:
            line += f"; l_inf {linf:.3f}, l2 {l2:.3f}, {secs:.2f} s per image"
        out.append(line)
    order = conn.execute("SELECT metric, held FROM photoguard_ordering WHERE experiment = ?", [exp]).fetchall()
    held = [m for m, h in order if h]
    missed = [m for m, h in order if not h]
    out.append("    noise < encoder < diffusion (disruption): "
               + (f"held on {', '.join(held)}" if held else "held on no metric")
               + (f"; not on {', '.join(missed)}" if missed else ""))
    enc, dif = reach.get("encoder", (None, None))[0], reach.get("diffusion", (None, None))[1]
    if enc is not None and dif is not None:
        out.append(f"    own objectives: the encoder attack moved the latent {100 * enc:.1f}% of the way to its target, "
                   f"the diffusion attack lowered its objective {100 * dif:.1f}%")
    if _has(conn, "photoguard_models"):
        q = dict(((m, k), (v, c)) for m, k, v, c in conn.execute(
            "SELECT model, metric, value, chance FROM photoguard_models WHERE experiment = ?", [exp]).fetchall())
        parts = []
        if ("vae", "reconstruction_psnr") in q:
            parts.append(f"VAE reconstruction {_fmt(q['vae', 'reconstruction_psnr'][0], 2)} dB")
        for key, what in (("generation_agreement", "generations"), ("inpaint_agreement", "inpaintings")):
            v, c = q.get(("unet", key), (None, None))
            if v is not None:
                parts.append(f"{what} recognized as their class {_fmt(v)} (chance {_fmt(c)})")
        if ("classifier", "test_accuracy") in q:
            parts.append(f"classifier accuracy {_fmt(q['classifier', 'test_accuracy'][0])}")
        if parts:
            out.append("    models: " + ", ".join(parts))
    return out


# every study's lines, in the report's order
STUDY_LINES = (_robustness_lines, _regimes_lines, _smallify_lines, _threedb_lines, _photoguard_lines)

