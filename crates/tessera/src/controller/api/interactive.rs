//! `tessera exec` and `tessera port-forward` through the controller: the caller must be able to
//! act on the job (not only see it, as for logs: a shell is more than output), each session is
//! in the audit log, and the controller relays the WebSocket to the replica's agent with its
//! own secret, frames as they are.

use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as TMessage;

use super::*;
use crate::state::ReplicaPhase;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    pub replica: Option<u32>,
    pub command: String,
    #[serde(default)]
    pub tty: bool,
    pub term: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardParams {
    pub replica: Option<u32>,
    pub port: u16,
}

/// Where replica `replica` of job `id` runs now: its agent's address, the secret to call it,
/// its key and the job's project; refused when the caller may not act on it or it is not
/// running.
async fn running_replica(
    ctl: &crate::controller::Ctl,
    caller: &Caller,
    id: u64,
    replica: u32,
    what: &'static str,
) -> Result<(String, String, String, String, String), ApiError> {
    let user = acting_user(caller, what)?;
    ctl.store.read(|s| {
        let job = visible_job(s, caller, id)?;
        let r = job
            .replicas
            .iter()
            .find(|r| r.index == replica && r.phase == ReplicaPhase::Running)
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "replica {replica} of job {id} is not running ({}); see `tessera describe \
                     job {id}`",
                    job.reason
                ))
            })?;
        let node = s
            .nodes
            .get(&r.node)
            .ok_or_else(|| ApiError::not_found(format!("node {} is gone", r.node)))?;
        Ok((
            node.address.clone(),
            crate::auth::callback_secret(&ctl.callback_key, &r.node),
            format!("{id}.{}.{replica}", job.attempt),
            job.project().to_string(),
            user,
        ))
    })
}

/// Writes a session to the audit log before it starts.
async fn audit(
    ctl: &crate::controller::Ctl,
    user: String,
    action: &'static str,
    project: String,
    job: u64,
    detail: String,
) -> Result<(), ApiError> {
    ctl.store
        .write(move |c, _| -> Result<(), ApiError> {
            crate::controller::audit::record(
                c,
                c.now_ms,
                &user,
                action,
                Some(&project),
                Some(job),
                &detail,
            )?;
            Ok(())
        })
        .await
}

/// Opens the agent's end: `ws://` for an agent served over HTTP.
async fn agent_socket(
    address: &str,
    path: &str,
    secret: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    ApiError,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let Some(rest) = address.strip_prefix("http://") else {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_IMPLEMENTED,
            format!(
                "the node's agent serves at {address}; exec and port-forward reach agents served \
                 over plain HTTP only, for now"
            ),
        ));
    };
    let mut req = format!("ws://{rest}{path}")
        .into_client_request()
        .map_err(|e| ApiError::internal(format!("the agent's address: {e}")))?;
    req.headers_mut().insert(
        axum::http::header::AUTHORIZATION,
        format!("Bearer {secret}")
            .parse()
            .map_err(|_| ApiError::internal("the node's secret"))?,
    );
    let (socket, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| {
        let said = match &e {
            tokio_tungstenite::tungstenite::Error::Http(r) => {
                String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned()
            }
            other => other.to_string(),
        };
        ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            format!("the node's agent refused: {said}"),
        )
    })?;
    Ok(socket)
}

/// Relays frames between the user's socket and the agent's until either closes.
async fn relay(
    user: WebSocket,
    agent: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) {
    let (mut utx, mut urx) = user.split();
    let (mut atx, mut arx) = agent.split();
    let up = async {
        while let Some(Ok(m)) = urx.next().await {
            let m = match m {
                AxMessage::Binary(b) => TMessage::Binary(b),
                AxMessage::Close(_) => break,
                _ => continue,
            };
            if atx.send(m).await.is_err() {
                break;
            }
        }
        let _ = atx.send(TMessage::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(m)) = arx.next().await {
            let m = match m {
                TMessage::Binary(b) => AxMessage::Binary(b),
                TMessage::Close(_) => break,
                _ => continue,
            };
            if utx.send(m).await.is_err() {
                break;
            }
        }
        let _ = utx.send(AxMessage::Close(None)).await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// `GET /v1/jobs/ID/exec?replica=N&command=["bash"]&tty=true` (a WebSocket): a process inside
/// the replica.
pub async fn exec_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
    Query(p): Query<ExecParams>,
    ws: WebSocketUpgrade,
) -> Result<axum::response::Response, ApiError> {
    let q = crate::interactive::ExecQuery {
        command: p.command,
        tty: p.tty,
        term: p.term,
    };
    let command = crate::interactive::command_of(&q).map_err(ApiError::bad)?;
    let replica = p.replica.unwrap_or(0);
    let (address, secret, key, project, user) =
        running_replica(&ctl, &caller, id, replica, "exec into jobs").await?;
    let query = {
        let mut u =
            reqwest::Url::parse("http://agent/").map_err(|e| ApiError::internal(e.to_string()))?;
        u.query_pairs_mut()
            .append_pair("command", &q.command)
            .append_pair("tty", if q.tty { "true" } else { "false" });
        if let Some(t) = &q.term {
            u.query_pairs_mut().append_pair("term", t);
        }
        u.query().unwrap_or_default().to_string()
    };
    let agent = agent_socket(&address, &format!("/v1/exec/{key}?{query}"), &secret).await?;
    let detail = format!(
        "exec into replica {replica}{}: {}",
        if q.tty { " with a terminal" } else { "" },
        command.join(" ")
    );
    audit(&ctl, user, "exec", project, id, detail).await?;
    Ok(ws.on_upgrade(move |socket| relay(socket, agent)))
}

/// `GET /v1/jobs/ID/port-forward?replica=N&port=P` (a WebSocket): a TCP connection to a port
/// the replica listens on.
pub async fn forward_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
    Query(p): Query<ForwardParams>,
    ws: WebSocketUpgrade,
) -> Result<axum::response::Response, ApiError> {
    let replica = p.replica.unwrap_or(0);
    let (address, secret, key, project, user) =
        running_replica(&ctl, &caller, id, replica, "forward ports of jobs").await?;
    let agent = agent_socket(
        &address,
        &format!("/v1/forward/{key}?port={}", p.port),
        &secret,
    )
    .await?;
    let detail = format!("port-forward to port {} of replica {replica}", p.port);
    audit(&ctl, user, "port-forward", project, id, detail).await?;
    Ok(ws.on_upgrade(move |socket| relay(socket, agent)))
}
