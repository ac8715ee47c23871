//! Text layouts shared by the commands.

use llmq_shared::outcome::{Status, TaskRecord};

/// The human-readable report of one task.
pub fn record(r: &TaskRecord) -> String {
    let dash = || "-".to_owned();
    let mut s = String::new();
    s.push_str(&format!("Task ID:   {}\n", r.task_id));
    s.push_str(&format!("Status:    {}\n", r.status));
    s.push_str(&format!(
        "Provider:  {}\n",
        r.provider.clone().unwrap_or_else(dash)
    ));
    s.push_str(&format!(
        "Model:     {}\n",
        r.model.clone().unwrap_or_else(dash)
    ));
    let success = match r.status {
        Status::Succeeded => "yes",
        s if s.is_final() => "no",
        _ => "not yet",
    };
    s.push_str(&format!("Success:   {success}\n"));
    s.push_str(&format!("Attempts:  {}\n", r.attempts));
    s.push_str(&format!(
        "Duration:  {:.2}s\n",
        r.duration_ms as f64 / 1000.0
    ));
    s.push_str(&format!(
        "Tokens:    {} in ({} cached) / {} out\n",
        r.input_tokens, r.cached_tokens, r.output_tokens
    ));
    s.push_str(&format!("Cost:      {}\n", usd(r.cost_usd)));
    if let Some(route) = &r.route {
        s.push_str(&format!("Route:     {route}\n"));
    }
    for e in &r.provider_errors {
        s.push_str(&format!("  failed:  {e}\n"));
    }
    if let Some(e) = &r.error {
        let class = r.error_class.map(|c| format!(" [{c}]")).unwrap_or_default();
        s.push_str(&format!("Error:     {e}{class}\n"));
    }
    for call in &r.tool_calls {
        s.push_str(&format!(
            "Tool call: {} {}({})\n",
            call.id, call.name, call.arguments
        ));
    }
    if let Some(o) = &r.output {
        s.push_str("Output:\n");
        s.push_str(o);
        if !o.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// Dollars with enough digits for sub-cent calls.
pub fn usd(v: f64) -> String {
    if v == 0.0 {
        "$0.00".into()
    } else if v < 0.01 {
        format!("${v:.6}")
    } else {
        format!("${v:.4}")
    }
}

/// `s` cut to `max` characters with an ellipsis, on one line.
pub fn cut(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    match one_line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}
