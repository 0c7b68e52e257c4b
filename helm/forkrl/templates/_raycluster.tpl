{{/* The spec of the Ray cluster: one head (job drivers) and one worker group per pool. The chart's
standing RayCluster has it; with controlPlane.admission=kueue every job's RayJob has it instead. */}}
{{- define "forkrl.rayClusterSpec" -}}
{{- $ft := .Values.ray.gcsFaultTolerance }}
rayVersion: {{ .Values.ray.version | quote }}
upgradeStrategy:
  type: {{ .Values.ray.upgradeStrategy }}
{{- with .Values.ray.autoscaling }}
{{- if .enabled }}
enableInTreeAutoscaling: true
autoscalerOptions:
  idleTimeoutSeconds: {{ .idleTimeoutSeconds }}
  upscalingMode: {{ .upscalingMode }}
  securityContext:
    {{- toYaml $.Values.containerSecurityContext | nindent 4 }}
  {{- if $.Values.ray.auth.enabled }}
  env:
    {{- include "forkrl.rayAuthEnv" $ | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
{{- if $ft.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ $ft.redisAddress | quote }}
  {{- if $ft.redisPasswordSecret.name }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ $ft.redisPasswordSecret.name }}
        key: {{ $ft.redisPasswordSecret.key }}
  {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    {{- range $k, $v := .Values.rayHead.rayStartParams }}
    {{ $k }}: {{ $v | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "forkrl.labels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
        {{- include "forkrl.rayPodLabel" . | nindent 8 }}
        {{- with .Values.rayHead.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.rayHead.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "forkrl.serviceAccountName" . }}
      automountServiceAccountToken: false  # tenants' code runs here: no Kubernetes API token
      {{- with .Values.rayHead.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with .Values.rayHead.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      {{- with .Values.image.pullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      {{- with .Values.rayHead.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.rayHead.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.rayHead.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "forkrl.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          securityContext:
            {{- toYaml .Values.containerSecurityContext | nindent 12 }}
          workingDir: /opt/forkrl
          ports:
            - {containerPort: 6379, name: gcs-server}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
          env:
            {{- include "forkrl.rayAuthEnv" . | nindent 12 }}
            {{- with .Values.rayHead.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with .Values.rayHead.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml .Values.rayHead.resources | nindent 12 }}
          volumeMounts:
            - name: runs
              mountPath: /var/lib/forkrl/runs
            {{- with .Values.rayHead.volumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "forkrl.runsVolume" . | nindent 8 }}
        {{- with .Values.rayHead.volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
workerGroupSpecs:
  {{- include "forkrl.workerGroup" (dict "root" . "name" "rollout" "resource" "forkrl_rollout" "group" .Values.rolloutWorkers) | nindent 2 }}
  {{- include "forkrl.workerGroup" (dict "root" . "name" "reward" "resource" "forkrl_reward" "group" .Values.rewardWorkers) | nindent 2 }}
  {{- include "forkrl.workerGroup" (dict "root" . "name" "learner" "resource" "forkrl_learner" "group" .Values.learners) | nindent 2 }}
{{- end }}
