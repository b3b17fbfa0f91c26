//! The agent's side of file operations ([`Request::Stat`] to [`Request::Give`]): the host's
//! requests done on the sandbox's [`Tree`] from inside, so that a backend whose files the
//! host cannot reach (a VM) moves them the same way as one whose files it can.

use std::io::{self, Read, Write};

use crate::protocol::{DATA_CHUNK, Request, Response, read_frame, write_frame};
use crate::sandboxfs;
use crate::server::{AgentError, Conn};
use crate::tree::Tree;

/// The answer for a failed file operation.
pub fn failed(e: &io::Error) -> Response {
    Response::Failed {
        errno: e.raw_os_error(),
        refused: sandboxfs::refusal(e).map(|r| r.what.clone()),
        message: e.to_string(),
    }
}

fn answer<T>(
    conn: &mut Conn,
    result: io::Result<T>,
    ok: impl FnOnce(T) -> Response,
) -> Result<(), AgentError> {
    let reply = match result {
        Ok(value) => ok(value),
        Err(e) => failed(&e),
    };
    write_frame(conn, &reply)?;
    Ok(())
}

/// Serves one file request; the tree is opened on the first.
pub fn serve(conn: &mut Conn, tree: &mut Option<Tree>, request: Request) -> Result<(), AgentError> {
    if tree.is_none() {
        match Tree::inside() {
            Ok(t) => *tree = Some(t),
            Err(e) => {
                if let Request::Create { .. } = request {
                    skip_body(conn)?;
                }
                write_frame(conn, &failed(&e))?;
                return Ok(());
            }
        }
    }
    let tree = tree.as_ref().expect("opened above");
    match request {
        Request::Stat { at, reader } => answer(conn, tree.stat(&at, reader), Response::Meta),
        Request::ReadLink { at, reader } => {
            answer(conn, tree.read_link(&at, reader), Response::Link)
        }
        Request::List { at, reader } => {
            let entries = match tree.list(&at, reader) {
                Ok(entries) => entries,
                Err(e) => return answer(conn, Err::<(), _>(e), |()| Response::Done),
            };
            // In frames of a few thousand: a directory may hold more than one frame can.
            for chunk in entries.chunks(crate::protocol::ENTRIES_PER_FRAME) {
                write_frame(conn, &Response::Entries(chunk.to_vec()))?;
            }
            write_frame(conn, &Response::Done)?;
            Ok(())
        }
        Request::Read { at, offset, reader } => {
            let (file, meta) = match tree.open(&at, offset, reader) {
                Ok(opened) => opened,
                Err(e) => return answer(conn, Err::<(), _>(e), |()| Response::Done),
            };
            write_frame(conn, &Response::Opened(meta))?;
            let mut rest = file.take(meta.size.saturating_sub(offset));
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                match rest.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => write_frame(conn, &Response::Data(buf[..n].to_vec()))?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        write_frame(conn, &failed(&e))?;
                        return Ok(());
                    }
                }
            }
            write_frame(conn, &Response::Done)?;
            Ok(())
        }
        Request::Create {
            at,
            mode,
            how,
            owner,
        } => {
            let mut making = tree.create(&at, mode, how, owner);
            let end = loop {
                match read_frame::<_, Request>(conn)? {
                    None => return Ok(()),
                    Some(Request::Data(data)) => {
                        if let Ok(creating) = &making {
                            if let Err(e) = creating.file().write_all(&data) {
                                making = Err(e);
                            }
                        }
                    }
                    Some(Request::End { mode, mtime_ns }) => break Some((mode, mtime_ns)),
                    Some(Request::Abort) => break None,
                    Some(other) => {
                        let message = format!("{other:?} came while a file was being made");
                        write_frame(conn, &Response::Error { message })?;
                        return Ok(());
                    }
                }
            };
            match (making, end) {
                (Ok(creating), Some((mode, mtime_ns))) => {
                    answer(conn, creating.finish(mode, mtime_ns), |meta| {
                        Response::Meta(Some(meta))
                    })
                }
                // Dropped unfinished: nothing of it stays.
                (Ok(_), None) => answer(conn, Ok(()), |()| Response::Done),
                (Err(e), _) => answer(conn, Err::<(), _>(e), |()| Response::Done),
            }
        }
        Request::MakeDir {
            at,
            mode,
            parents,
            owner,
        } => answer(conn, tree.make_dir(&at, mode, parents, owner), |()| {
            Response::Done
        }),
        Request::Symlink {
            at,
            target,
            mtime_ns,
            owner,
        } => answer(conn, tree.symlink(&at, &target, mtime_ns, owner), |()| {
            Response::Done
        }),
        Request::SetMeta {
            at,
            mode,
            mtime_ns,
            owner,
        } => answer(conn, tree.set_meta(&at, mode, mtime_ns, owner), |()| {
            Response::Done
        }),
        Request::Remove {
            at,
            recursive,
            owner,
        } => answer(conn, tree.remove(&at, recursive, owner), |()| {
            Response::Done
        }),
        Request::Give { at, owner } => answer(conn, tree.give(&at, owner), |()| Response::Done),
        Request::Data(_) | Request::End { .. } | Request::Abort => {
            let message = "file bytes came with no file being made".to_string();
            write_frame(conn, &Response::Error { message })?;
            Ok(())
        }
        other => {
            let message = format!("{other:?} is no file operation");
            write_frame(conn, &Response::Error { message })?;
            Ok(())
        }
    }
}

/// Reads a `Create`'s bytes up to its `End` or `Abort`, for one that cannot be made.
fn skip_body(conn: &mut Conn) -> Result<(), AgentError> {
    loop {
        match read_frame::<_, Request>(conn)? {
            None | Some(Request::End { .. }) | Some(Request::Abort) => return Ok(()),
            Some(_) => {}
        }
    }
}
