//! `longhaul top`: a terminal view of runs, a run's ring and workers, and its event log, that
//! refreshes live (ratatui).
//!
//! The drawing is a pure function of a [`Snapshot`] (what the control API returned) and a
//! [`View`] (the selection and the log lines received): [`draw`] renders into any ratatui
//! backend, so tests render into a `TestBackend` and read the cells. IO is at the edge: [`run`]
//! polls `ListRuns`/`ListWorkers` every interval, follows the selected run's `WatchRun` stream
//! for its log, and reads keys on a thread of its own.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::pb;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Gauge, Paragraph, Row, Table, TableState, Wrap};
use tokio::sync::mpsc;

use crate::views::{liveness_name, state_name, uptime};
use client::Control;

/// Log lines kept for the selected run.
const LOG_LINES: usize = 200;

/// What the control API returned at one refresh.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Newest first.
    pub runs: Vec<pb::RunInfo>,
    pub workers: Vec<pb::WorkerInfo>,
    /// Where it came from, for the title.
    pub coordinator: String,
    /// When (Unix ms).
    pub unix_ms: u64,
}

/// The view's own state: which run is selected, its log so far, the last error.
#[derive(Debug, Default)]
pub struct View {
    pub selected: usize,
    pub log: VecDeque<String>,
    pub error: Option<String>,
}

impl View {
    /// The selected run, if any.
    pub fn run<'a>(&self, s: &'a Snapshot) -> Option<&'a pb::RunInfo> {
        s.runs.get(self.selected.min(s.runs.len().saturating_sub(1)))
    }

    fn push_log(&mut self, line: String) {
        self.log.push_back(line);
        while self.log.len() > LOG_LINES {
            self.log.pop_front();
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite()).map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn percent(v: f64) -> String {
    if v.is_finite() { format!("{:.1}%", v * 100.0) } else { "-".into() }
}

fn state_color(state: i32) -> Color {
    match state_name(state) {
        "running" => Color::Cyan,
        "completed" => Color::Green,
        "pending" => Color::Yellow,
        _ => Color::Red,
    }
}

fn liveness_color(l: i32) -> Color {
    match liveness_name(l) {
        "alive" => Color::Green,
        "suspect" => Color::Yellow,
        _ => Color::Red,
    }
}

/// Draws one frame.
pub fn draw(f: &mut Frame<'_>, s: &Snapshot, v: &View) {
    let area = f.area();
    let runs_height = (s.runs.len().min(8) as u16) + 3;
    let members = v.run(s).map_or(0, |r| s.workers.iter().filter(|w| belongs(w, r)).count());
    let [title, runs, detail, ring, workers, log] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(runs_height),
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Length(members.min(16) as u16 + 3),
        Constraint::Min(4),
    ])
    .areas(area);
    let help = " q quit · ↑↓ select a run ";
    let head = Line::from(vec![
        Span::styled(" longhaul top ", Style::new().bold().reversed()),
        Span::raw(format!(" {} ", s.coordinator)),
        Span::styled(
            match &v.error {
                Some(e) => format!(" {e} "),
                None => String::new(),
            },
            Style::new().fg(Color::Red),
        ),
        Span::styled(help, Style::new().dim()),
    ]);
    f.render_widget(Paragraph::new(head), title);
    draw_runs(f, runs, s, v);
    let Some(run) = v.run(s) else {
        f.render_widget(
            Paragraph::new("No runs yet: `longhaul submit run.toml`.").block(Block::bordered()),
            detail,
        );
        return;
    };
    draw_detail(f, detail, run);
    draw_ring(f, ring, run, s);
    draw_workers(f, workers, run, s);
    let lines: Vec<Line<'_>> = v
        .log
        .iter()
        .rev()
        .take(log.height.saturating_sub(2) as usize)
        .rev()
        .map(|l| Line::raw(l.as_str()))
        .collect();
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(format!(" run {} events ", run.run_id))),
        log,
    );
}

fn draw_runs(f: &mut Frame<'_>, area: Rect, s: &Snapshot, v: &View) {
    let header =
        Row::new(["RUN", "NAME", "STATE", "STEP", "WORKERS", "LOSS", "ACC", "TOKENS/S", "UTIL"])
            .style(Style::new().bold());
    let rows = s.runs.iter().map(|r| {
        Row::new(vec![
            Span::raw(r.run_id.to_string()),
            Span::raw(r.name.clone()),
            Span::styled(state_name(r.state), Style::new().fg(state_color(r.state))),
            Span::raw(format!("{}/{}", r.committed_step, r.total_steps)),
            Span::raw(format!("{} ({}-{})", r.workers, r.min_workers, r.max_workers)),
            Span::raw(opt(r.loss, 4)),
            Span::raw(r.accuracy.map_or_else(|| "-".into(), percent)),
            Span::raw(format!("{:.0}", r.tokens_per_sec)),
            Span::raw(percent(r.compute_utilisation)),
        ])
    });
    let widths = [
        Constraint::Length(5),
        Constraint::Min(12),
        Constraint::Length(10),
        Constraint::Length(16),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(7),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(Block::bordered().title(format!(" runs ({}) ", s.runs.len())));
    let mut state = TableState::default()
        .with_selected((!s.runs.is_empty()).then(|| v.selected.min(s.runs.len() - 1)));
    f.render_stateful_widget(table, area, &mut state);
}

fn draw_detail(f: &mut Frame<'_>, area: Rect, r: &pb::RunInfo) {
    let ratio = if r.total_steps == 0 {
        0.0
    } else {
        (r.committed_step as f64 / r.total_steps as f64).clamp(0.0, 1.0)
    };
    let label = format!(
        "{} · step {}/{} · epoch {} · loss {} · tokens/s {:.0} · util {} · restarts {}/{} · {}",
        state_name(r.state),
        r.committed_step,
        r.total_steps,
        r.epoch,
        opt(r.loss, 4),
        r.tokens_per_sec,
        percent(r.compute_utilisation),
        r.restarts,
        r.restart_budget,
        r.message
    );
    f.render_widget(
        Gauge::default()
            .ratio(ratio)
            .label(label)
            .gauge_style(Style::new().fg(state_color(r.state)))
            .block(Block::bordered().title(format!(" run {} · {} ", r.run_id, r.name))),
        area,
    );
}

fn draw_ring(f: &mut Frame<'_>, area: Rect, r: &pb::RunInfo, s: &Snapshot) {
    let mut spans = Vec::new();
    for (i, id) in r.ring.iter().enumerate() {
        let w = s.workers.iter().find(|w| w.worker_id == *id);
        let color = w.map_or(Color::Red, |w| liveness_color(w.liveness));
        let host = w.map(|w| w.host.as_str()).unwrap_or("?");
        spans.push(Span::styled(format!("worker-{id} ({host})"), Style::new().fg(color).bold()));
        if r.ring.len() > 1 {
            spans.push(Span::raw(match r.ring_rtt_us.get(i).copied().unwrap_or(0) {
                0 => " →(rtt ?) ".to_owned(),
                us => format!(" →({:.1} ms) ", us as f64 / 1000.0),
            }));
        }
    }
    if r.ring.len() > 1 {
        spans.push(Span::raw("↺"));
    }
    if r.ring.is_empty() {
        spans.push(Span::styled("no ring now", Style::new().dim()));
    }
    f.render_widget(
        Paragraph::new(Line::from(spans)).block(Block::bordered().title(" ring, in order ")),
        area,
    );
}

/// Whether the workers table of run `r` lists `w`: assigned to it, in its ring, or evicted
/// from it.
fn belongs(w: &pb::WorkerInfo, r: &pb::RunInfo) -> bool {
    w.run_id == Some(r.run_id) || r.ring.contains(&w.worker_id) || w.banned_from.contains(&r.run_id)
}

fn draw_workers(f: &mut Frame<'_>, area: Rect, r: &pb::RunInfo, s: &Snapshot) {
    let header = Row::new([
        "WORKER", "HOST", "STATE", "SAMPLES", "VERIFIED", "AUDITS", "STRIKES", "AUDITED", "UTIL",
        "UPTIME",
    ])
    .style(Style::new().bold());
    let mine = s.workers.iter().filter(|w| belongs(w, r));
    let rows = mine.map(|w| {
        let banned = w.banned_from.contains(&r.run_id);
        Row::new(vec![
            Span::raw(w.name.clone()),
            Span::raw(w.host.clone()),
            if banned {
                Span::styled("evicted", Style::new().fg(Color::Red))
            } else {
                Span::styled(liveness_name(w.liveness), Style::new().fg(liveness_color(w.liveness)))
            },
            Span::raw(w.samples.to_string()),
            Span::raw(w.verified_samples.to_string()),
            Span::raw(w.audits_passed.to_string()),
            Span::raw(w.strikes.to_string()),
            Span::raw(w.audits_performed.to_string()),
            Span::raw(percent(w.compute_utilisation)),
            Span::raw(uptime(w.uptime_ms)),
        ])
    });
    let widths = [
        Constraint::Length(12),
        Constraint::Min(10),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
    ];
    f.render_widget(
        Table::new(rows, widths).header(header).block(Block::bordered().title(" workers ")),
        area,
    );
}

/// Reads the runs (newest first, at most 100) and every worker (at most 1,000).
async fn snapshot(c: &mut Control, coordinator: &str) -> Result<Snapshot> {
    let mut runs = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .list_runs(pb::ListRunsRequest { page_size: 500, after })
            .await
            .context("listing runs")?
            .into_inner();
        runs.extend(page.runs);
        if page.next_after == 0 || runs.len() >= 10_000 {
            break;
        }
        after = page.next_after;
    }
    runs.reverse();
    runs.truncate(100);
    let mut workers = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .list_workers(pb::ListWorkersRequest { page_size: 1000, after })
            .await
            .context("listing workers")?
            .into_inner();
        workers.extend(page.workers);
        if page.next_after == 0 || workers.len() >= 1000 {
            break;
        }
        after = page.next_after;
    }
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(Snapshot { runs, workers, coordinator: coordinator.to_owned(), unix_ms })
}

enum Input {
    Key(KeyCode, KeyModifiers),
    Resize,
}

/// Follows `run`'s events into `tx` (its log so far, then each line) until the stream ends.
fn follow(
    mut c: Control,
    run: u64,
    tx: mpsc::Sender<(u64, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(stream) = c.watch_run(pb::WatchRunRequest { run_id: run }).await else { return };
        let mut stream = stream.into_inner();
        while let Ok(Some(ev)) = stream.message().await {
            if let Some(pb::run_event::Event::Log(line)) = ev.event {
                let at = time::OffsetDateTime::from_unix_timestamp((ev.unix_ms / 1000) as i64)
                    .map(|t| format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()))
                    .unwrap_or_default();
                if tx.send((run, format!("{at}  {line}"))).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// Runs the view until `q`, Esc or Ctrl-C: refreshes every `every`, follows the selected run's
/// log. `first` selects a run at start.
pub async fn run(
    c: Control,
    coordinator: String,
    every: Duration,
    first: Option<u64>,
) -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "longhaul top needs a terminal; in a script or a log use `longhaul status RUN`, \
             `longhaul logs RUN -f` or `--output json`"
        );
    }
    let mut control = c.clone();
    let mut snap = snapshot(&mut control, &coordinator).await?;
    let mut view = View::default();
    if let Some(id) = first {
        view.selected = snap
            .runs
            .iter()
            .position(|r| r.run_id == id)
            .with_context(|| format!("no run {id}"))?;
    }
    // Keys on a thread of their own (crossterm's reads block).
    let (keys_tx, mut keys) = mpsc::channel(64);
    std::thread::spawn(move || {
        loop {
            let ev = match event::poll(Duration::from_millis(200)) {
                Ok(true) => event::read(),
                Ok(false) => {
                    if keys_tx.is_closed() {
                        return;
                    }
                    continue;
                }
                Err(e) => Err(e),
            };
            let input = match ev {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                    Input::Key(k.code, k.modifiers)
                }
                Ok(Event::Resize(..)) => Input::Resize,
                Ok(_) => continue,
                Err(_) => return,
            };
            if keys_tx.blocking_send(input).is_err() {
                return;
            }
        }
    });
    let (log_tx, mut log_rx) = mpsc::channel(256);
    let mut following: Option<(u64, tokio::task::JoinHandle<()>)> = None;
    let mut terminal = ratatui::init();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        // Follow the selected run's log.
        let selected = view.run(&snap).map(|r| r.run_id);
        if following.as_ref().map(|f| f.0) != selected {
            if let Some((_, task)) = following.take() {
                task.abort();
            }
            view.log.clear();
            following = selected.map(|id| (id, follow(c.clone(), id, log_tx.clone())));
        }
        if let Err(e) = terminal.draw(|f| draw(f, &snap, &view)) {
            break Err(anyhow::Error::from(e).context("drawing"));
        }
        tokio::select! {
            _ = tick.tick() => match snapshot(&mut control, &coordinator).await {
                Ok(s) => { snap = s; view.error = None; }
                Err(e) => view.error = Some(format!("{e:#}")),
            },
            Some((run, line)) = log_rx.recv() => {
                if Some(run) == following.as_ref().map(|f| f.0) {
                    view.push_log(line);
                }
            }
            k = keys.recv() => match k {
                Some(Input::Key(KeyCode::Char('q') | KeyCode::Esc, _)) | None => break Ok(()),
                Some(Input::Key(KeyCode::Char('c'), m)) if m.contains(KeyModifiers::CONTROL) => break Ok(()),
                Some(Input::Key(KeyCode::Up | KeyCode::Char('k'), _)) => {
                    view.selected = view.selected.min(snap.runs.len().saturating_sub(1)).saturating_sub(1);
                }
                Some(Input::Key(KeyCode::Down | KeyCode::Char('j'), _)) => {
                    view.selected = (view.selected + 1).min(snap.runs.len().saturating_sub(1));
                }
                Some(_) => {}
            },
        }
    };
    ratatui::restore();
    if let Some((_, task)) = following {
        task.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn run(id: u64, name: &str, state: pb::RunState, ring: Vec<u64>) -> pb::RunInfo {
        pb::RunInfo {
            run_id: id,
            name: name.into(),
            state: state as i32,
            epoch: 3,
            committed_step: 420,
            total_steps: 600,
            workers: ring.len() as u32,
            min_workers: 2,
            max_workers: 4,
            loss: Some(0.0123),
            tokens_per_sec: 15000.0,
            compute_utilisation: 0.61,
            message: "epoch 3 with 3 workers".into(),
            // The first link measured, the others not yet.
            ring_rtt_us: ring
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { 1_250 } else { 0 })
                .collect(),
            ring,
            ..Default::default()
        }
    }

    fn worker(id: u64, host: &str, run: u64, liveness: pb::Liveness) -> pb::WorkerInfo {
        pb::WorkerInfo {
            worker_id: id,
            name: format!("worker-{id}"),
            host: host.into(),
            liveness: liveness as i32,
            run_id: Some(run),
            samples: 1000 * id,
            verified_samples: 1000 * id,
            audits_passed: id,
            uptime_ms: 65_000,
            ..Default::default()
        }
    }

    fn render(s: &Snapshot, v: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 36)).unwrap();
        t.draw(|f| draw(f, s, v)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width).map(|x| buf[(x, y)].symbol().to_owned()).collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_view_shows_runs_the_selected_ring_in_order_its_workers_and_its_log() {
        let s = Snapshot {
            runs: vec![
                run(2, "gpt-addition", pb::RunState::Running, vec![7, 5, 6]),
                run(1, "older", pb::RunState::Completed, vec![]),
            ],
            workers: vec![
                worker(5, "gpu-a", 2, pb::Liveness::Alive),
                worker(6, "gpu-b", 2, pb::Liveness::Suspect),
                worker(7, "gpu-c", 2, pb::Liveness::Alive),
                worker(9, "elsewhere", 1, pb::Liveness::Dead),
            ],
            coordinator: "https://coord:7070".into(),
            unix_ms: 0,
        };
        let mut v = View::default();
        v.push_log("12:00:01  epoch 3 formed".into());
        let text = render(&s, &v);
        assert!(text.contains("gpt-addition") && text.contains("older"), "{text}");
        assert!(text.contains("420/600"), "{text}");
        // The ring in the coordinator's order, and only the selected run's workers.
        let ring = text.lines().find(|l| l.contains("worker-7 (gpu-c)")).expect("the ring");
        let (a, b, c) = (
            ring.find("worker-7").unwrap(),
            ring.find("worker-5").unwrap(),
            ring.find("worker-6").unwrap(),
        );
        assert!(a < b && b < c, "{ring}");
        assert!(ring.contains("(1.2 ms)") && ring.contains("(rtt ?)"), "{ring}");
        assert!(text.contains("suspect") && !text.contains("elsewhere"), "{text}");
        assert!(text.contains("epoch 3 formed"), "{text}");
        // Selecting the other run shows its (empty) ring.
        v.selected = 1;
        let text = render(&s, &v);
        assert!(text.contains("no ring now") && text.contains("elsewhere"), "{text}");
        // A selection past the end shows the last run rather than nothing.
        v.selected = 99;
        assert!(render(&s, &v).contains("run 1 · older"));
    }

    #[test]
    fn no_runs_is_said() {
        let s = Snapshot::default();
        assert!(render(&s, &View::default()).contains("No runs yet"));
    }

    #[test]
    fn the_log_keeps_a_bounded_tail() {
        let mut v = View::default();
        for i in 0..1000 {
            v.push_log(format!("line {i}"));
        }
        assert_eq!(v.log.len(), LOG_LINES);
        assert_eq!(v.log.back().map(String::as_str), Some("line 999"));
    }
}
