//! Runs a parsed command line: the service or one admin command. Output for people goes to
//! stdout; logs go to stderr.

use std::process::ExitCode;

use anyhow::Context as _;
use bus::DeadLetterQueue;
use platform::shutdown::cancel_on_signal;

use crate::admin;
use crate::app::{Application, connect_db, connect_redis};
use crate::config::{Cli, Command, DlqAction};
use crate::sweeper::DeadLetters;

/// Runs `cli` and returns the process exit code.
pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.clone().unwrap_or(Command::Serve) {
        Command::Serve => {
            let stop = cancel_on_signal();
            if let Some(app) =
                platform::shutdown::unless_stopped(&stop, Application::build(cli)).await
            {
                app?.run_until_stopped(stop).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            platform::db::migrate(
                &cli.common.database_url,
                crate::app::SERVICE_NAME,
                &store::MIGRATOR,
                cli.common.db_connect_wait(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck => {
            Ok(platform::healthcheck::probe(&cli.settings.listen_addr, "/healthz").await)
        }
        Command::Verify { projection } => {
            let pool = connect_db(&cli).await?;
            let report = crate::verify::verify(&pool, projection).await?;
            print!("{}", report.render(projection));
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status { json } => {
            let pool = platform::db::connect_existing(
                &cli.common.database_url,
                crate::app::SERVICE_NAME,
                2,
            )
            .await
            .map_err(|e| platform::config::error_chain(e.as_ref()));
            let (_, redis, keys) = connect_redis(&cli)?;
            let status =
                crate::status::gather(pool.as_ref().map_err(Clone::clone), &redis, &keys).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", crate::status::render(&status));
            }
            Ok(if status.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Rebuild { projection } => {
            let pool = connect_db(&cli).await?;
            let (_, redis, keys) = connect_redis(&cli)?;
            let dead_letters = DeadLetters {
                queue: DeadLetterQueue::new(redis, keys),
                consumer: format!("{}/rebuild", cli.settings.consumer_name()),
            };
            let outcome = admin::rebuild(
                &pool,
                projection,
                cli.settings.rebuild_batch_size,
                Some(&dead_letters),
            )
            .await?;
            println!(
                "rebuilt {projection}: {} events in {:.1} s, checkpoint {}; live writers \
                 paused {:.2} s for the swap ({} events folded then){}",
                outcome.events,
                outcome.elapsed.as_secs_f64(),
                outcome.position,
                outcome.locked.as_secs_f64(),
                outcome.events_under_lock,
                if outcome.parked > 0 {
                    format!(
                        ", {} stream(s) parked (see `projector dlq parked {projection}`)",
                        outcome.parked
                    )
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq {
            action,
            group,
            id,
            all,
            stream,
            after,
            after_position,
        } => {
            let projection = admin::projection_of_group(&group)?;
            if after.is_some() && action != DlqAction::List {
                // `replay` and `purge` without --id act on every letter: an --after they
                // ignored would resolve letters the operator meant to leave.
                anyhow::bail!("--after goes with `dlq list` only");
            }
            if after_position.is_some() && action != DlqAction::Parked {
                anyhow::bail!("--after-position goes with `dlq parked` only");
            }
            let (_, redis, keys) = connect_redis(&cli)?;
            let dlq = DeadLetterQueue::new(redis, keys);
            if let Some(stream) = stream {
                let resolve = match action {
                    DlqAction::Replay => admin::Resolve::Replay,
                    DlqAction::Purge => admin::Resolve::Purge,
                    _ => anyhow::bail!("--stream goes with `dlq replay` or `dlq purge`"),
                };
                let pool = connect_db(&cli).await?;
                let resolution =
                    crate::parked::resolve_stream(&pool, &dlq, projection, resolve, &stream)
                        .await?;
                let verb = if resolve == admin::Resolve::Replay {
                    "replay"
                } else {
                    "purge"
                };
                let ok = resolution.ok;
                print!("{}", admin::render_resolutions(verb, &[resolution]));
                return Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            match action {
                DlqAction::Parked => {
                    let pool = connect_db(&cli).await?;
                    let page = crate::parked::list_page(
                        &pool,
                        &dlq,
                        projection,
                        after_position,
                        crate::parked::PARKED_PAGE,
                    )
                    .await?;
                    print!("{}", crate::parked::render(&page));
                    Ok(ExitCode::SUCCESS)
                }
                DlqAction::List if id.is_none() => {
                    let page = admin::list_page(&dlq, &group, after.as_deref()).await?;
                    print!("{}", admin::render_page(&page));
                    Ok(ExitCode::SUCCESS)
                }
                DlqAction::List => {
                    let letters = admin::select(&dlq, &group, id.as_deref()).await?;
                    print!("{}", admin::render_list(&letters));
                    Ok(ExitCode::SUCCESS)
                }
                DlqAction::Show => {
                    let id = id.context("`dlq show` needs --id <entry id>")?;
                    let letters = admin::select(&dlq, &group, Some(&id)).await?;
                    for letter in &letters {
                        print!("{}", admin::render_show(letter));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                DlqAction::Replay | DlqAction::Purge => {
                    if action == DlqAction::Purge && id.is_none() && !all {
                        anyhow::bail!(
                            "`dlq purge` needs --id <entry id>, --all or --stream <stream>"
                        );
                    }
                    let pool = connect_db(&cli).await?;
                    let verb = if action == DlqAction::Replay {
                        "replay"
                    } else {
                        "purge"
                    };
                    if id.is_none() {
                        let resolve = if action == DlqAction::Replay {
                            admin::Resolve::Replay
                        } else {
                            admin::Resolve::Purge
                        };
                        let done = admin::resolve_all(
                            &pool,
                            &dlq,
                            projection,
                            resolve,
                            admin::DLQ_PAGE,
                            |page| print!("{}", admin::render_resolutions(verb, page)),
                        )
                        .await?;
                        if done.ok + done.failed == 0 {
                            if resolve == admin::Resolve::Replay {
                                println!("no dead letters, no parked streams");
                            } else {
                                println!("no dead letters");
                            }
                        }
                        return Ok(if done.failed == 0 {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        });
                    }
                    let letters = admin::select(&dlq, &group, id.as_deref()).await?;
                    let (verb, resolutions) = if action == DlqAction::Replay {
                        (
                            "replay",
                            admin::replay(&pool, &dlq, projection, &letters).await?,
                        )
                    } else {
                        (
                            "purge",
                            admin::purge(&pool, &dlq, projection, &letters).await?,
                        )
                    };
                    print!("{}", admin::render_resolutions(verb, &resolutions));
                    Ok(if resolutions.iter().all(|r| r.ok) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
            }
        }
    }
}
