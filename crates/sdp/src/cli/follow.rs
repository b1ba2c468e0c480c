//! Showing a log as it comes: step progress per service with durations, the services' lines
//! prefixed by their name, and what became of the deployment at the end.

use std::collections::HashMap;

use sdp_api::Frame;
use sdp_client::{Follow, Followed};

use super::Failure;
use super::output::{self, BAD, DIM, GOOD, NAME, note, say, state_style};

/// How a followed log ended.
pub struct Ended {
    pub state: String,
    pub error: Option<String>,
    /// The first step that failed, as `service: step`.
    pub failed_step: Option<String>,
}

/// Renders frames for people, or as one JSON object a line for programs.
pub struct Render {
    json: bool,
    /// Only this service's frames (and the deployment's own).
    service: Option<String>,
    width: usize,
    /// The step each service (or the deployment, `None`) is at, and when it began.
    current: HashMap<Option<String>, (String, String)>,
    failed_step: Option<String>,
}

impl Render {
    pub fn new(json: bool, service: Option<String>, services: &[String]) -> Render {
        let width = services.iter().map(|s| s.len()).max().unwrap_or(3).max(3);
        Render {
            json,
            service,
            width,
            current: HashMap::new(),
            failed_step: None,
        }
    }

    fn wanted(&self, service: Option<&str>) -> bool {
        match (&self.service, service) {
            (Some(wanted), Some(service)) => wanted == service,
            _ => true,
        }
    }

    pub fn frame(&mut self, frame: &Frame) {
        if let Frame::Step {
            service,
            step,
            state,
            ..
        } = frame
            && state == "failed"
            && self.failed_step.is_none()
        {
            self.failed_step = Some(match service {
                Some(service) => format!("{service}: {step}"),
                None => step.clone(),
            });
        }
        if self.json {
            output::print_json_line(frame);
            return;
        }
        match frame {
            Frame::Log {
                service,
                stream,
                line,
                ..
            } => {
                if !self.wanted(service.as_deref()) {
                    return;
                }
                let who = service.as_deref().unwrap_or("sdp");
                let style = match stream.as_str() {
                    "system" => DIM,
                    _ => anstyle::Style::new(),
                };
                output::out(format_args!(
                    "{}{who:>width$} |{} {}{line}{}\n",
                    NAME.render(),
                    NAME.render_reset(),
                    style.render(),
                    style.render_reset(),
                    width = self.width
                ));
            }
            Frame::Step {
                ts,
                service,
                step,
                state,
                ..
            } => {
                if !self.wanted(service.as_deref()) {
                    return;
                }
                // A service's steps follow each other: the next one's start is the end of
                // the one before, which the agent does not report apart.
                let before = self.current.remove(service);
                let took = |began: &str| {
                    output::between(began, ts)
                        .map(output::span)
                        .unwrap_or_else(|| "?".into())
                };
                let line = match (state.as_str(), before) {
                    ("running", before) => {
                        self.current
                            .insert(service.clone(), (step.clone(), ts.clone()));
                        match before {
                            Some((prev, began)) => {
                                format!("{step}  ({prev} took {})", took(&began))
                            }
                            None => step.clone(),
                        }
                    }
                    (_, Some((prev, began))) if prev == *step => {
                        format!("{step} {state} in {}", took(&began))
                    }
                    (_, Some((prev, began))) => {
                        format!("{step} {state}  ({prev} took {})", took(&began))
                    }
                    (_, None) => format!("{step} {state}"),
                };
                let who = service.as_deref().unwrap_or("sandbox");
                say(state_style(state), format!("==> {who}: {line}"));
            }
            Frame::Instance {
                service,
                state,
                reason,
                restarts,
                ..
            } => {
                if !self.wanted(Some(service)) {
                    return;
                }
                let reason = reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                let restarts = if *restarts > 0 {
                    format!(", {restarts} restarts")
                } else {
                    String::new()
                };
                say(
                    state_style(state),
                    format!("==> {service}: {state}{reason}{restarts}"),
                );
            }
            Frame::End { state, error, .. } => {
                let error = error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                let style = if state == "ready" { GOOD } else { BAD };
                say(style, format!("==> {state}{error}"));
            }
        }
    }
}

/// Follows `follow` to its end, rendering every frame; `None` when the stream closed without
/// an end frame.
pub async fn to_end(follow: &mut Follow, render: &mut Render) -> Result<Option<Ended>, Failure> {
    while let Some(event) = follow.next().await? {
        match event {
            Followed::Frame(frame) => {
                render.frame(&frame);
                if let Frame::End { state, error, .. } = frame {
                    return Ok(Some(Ended {
                        state,
                        error,
                        failed_step: render.failed_step.take(),
                    }));
                }
            }
            Followed::Lost(why) => note(
                DIM,
                format!(
                    "(connection lost: {why}; connecting again from line {})",
                    follow.next_seq()
                ),
            ),
            Followed::Resumed => note(DIM, "(connected again)"),
        }
    }
    Ok(None)
}
