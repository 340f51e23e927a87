//! The shim's tracing subscriber: the spans of a pod dump (`pod_dump`) and of a container's
//! restore (`restore`) carry the sandbox id, the pod or container name and each phase's end as
//! fields; when a span closes, its name and fields go to the shim's log in one line
//! (`pod_dump sandbox=... pod=ns/name preflight_ms=3 ... committed_ms=412`). Log records stay
//! on the `log` crate (containerd-shim's logger); only spans come here.

use std::fmt::Debug;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// A span's fields that have a value, in the order they were set.
#[derive(Debug, Default)]
struct Fields(Vec<(&'static str, String)>);

impl Fields {
    fn set(&mut self, name: &'static str, value: String) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.set(field.name(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), value.to_owned());
    }
}

/// Writes each closed span's name and fields to `sink`, one line per span.
pub struct SpanLines<F> {
    sink: F,
}

impl<F> SpanLines<F> {
    pub fn new(sink: F) -> Self {
        Self { sink }
    }
}

/// `name k=v k=v`; a value with a space is quoted.
fn line(name: &str, fields: &Fields) -> String {
    let mut out = name.to_owned();
    for (k, v) in &fields.0 {
        if v.contains(' ') {
            out.push_str(&format!(" {k}={v:?}"));
        } else {
            out.push_str(&format!(" {k}={v}"));
        }
    }
    out
}

impl<S, F> Layer<S> for SpanLines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    F: Fn(String) + Send + Sync + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let extensions = span.extensions();
        let empty = Fields::default();
        let fields = extensions.get::<Fields>().unwrap_or(&empty);
        (self.sink)(line(span.name(), fields));
    }
}

/// Installs the subscriber for the shim's process: closed spans go to the shim's log at info.
pub fn install() {
    let subscriber = tracing_subscriber::registry().with(SpanLines::new(|line: String| log::info!("{line}")));
    if let Err(e) = tracing::subscriber::set_global_default(subscriber) {
        log::warn!("no span log: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn a_closed_span_is_one_line_with_the_fields_set() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let subscriber = tracing_subscriber::registry().with(SpanLines::new(move |l: String| {
            sink.lock().expect("lines").push(l)
        }));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "pod_dump",
                sandbox = "abc",
                pod = "ns/web 0",
                frozen_ms = tracing::field::Empty,
                thawed_ms = tracing::field::Empty,
                committed_ms = tracing::field::Empty,
            );
            span.record("thawed_ms", 40u64);
            span.record("frozen_ms", 12u64);
            let copy = span.clone();
            drop(span);
            assert!(lines.lock().expect("lines").is_empty(), "open while a copy lives");
            drop(copy);
        });
        let lines = lines.lock().expect("lines");
        assert_eq!(
            lines.as_slice(),
            ["pod_dump sandbox=abc pod=\"ns/web 0\" thawed_ms=40 frozen_ms=12"],
            "unset fields are left out, set ones in the order they were set"
        );
    }
}
